//! Every durable step, failed and crashed at, through the real binary.
//!
//! For each failpoint (see `src/failpoint.rs` and RELIABILITY.md): one test
//! makes the step fail (the server answers UNAVAILABLE or retries, and goes
//! on), one kills the process with SIGKILL right there. Either way the server
//! is then restarted without failpoints, and the checks are the same: no room
//! was handed out twice, every acknowledged room resolves to the worker and
//! dp_size it was issued for, and rooms issued after the restart are new.
//!
//! Needs the `failpoints` feature (the test command builds with it).

use crate::common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::load::{self, Load, OnError};
use common::{run_cli_env, timed, EtcdProcess, ServerProcess};
use room_allocator::pb;
use tonic::Code;

const WORKERS: [(&str, u32); 3] = [("fp-dp1", 1), ("fp-dp3", 3), ("fp-dp8", 8)];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// The step returns an error once (after `skip` passes).
    Fail,
    /// The process is killed with SIGKILL at the step (after `skip` passes).
    Crash,
}

fn failpoints(name: &str, skip: u32, mode: Mode) -> String {
    match mode {
        Mode::Fail => format!("{name}={skip}*off->1*return->off"),
        Mode::Crash => format!("{name}={skip}*off->return(crash)"),
    }
}

async fn register_all(server: &ServerProcess) {
    let mut client = server.client().await;
    for (worker, dp_size) in WORKERS {
        // A registration may itself meet the failpoint: retry.
        for attempt in 0.. {
            let result = timed(client.register_worker(pb::RegisterWorkerRequest {
                prefill_worker: worker.into(),
                dp_size,
            }))
            .await;
            match result {
                Ok(_) => break,
                Err(status) if attempt < 20 && status.code() == Code::Unavailable => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(status) => panic!("register {worker}: {status:?}"),
            }
        }
    }
}

/// How long a test waits for the load to reach its failpoint. Group commit
/// and growing ranges make writes rarer the slower the machine, so on a
/// loaded one (the test command runs suites side by side) the eighth commit
/// can take many seconds; the load itself runs longer than this.
const HIT_LIMIT: Duration = Duration::from_secs(45);

/// AllocateRoom and LeaseRooms loads on every worker.
fn start_load(
    url: &str,
    record: &load::Shared,
    on_error: OnError,
) -> Vec<tokio::task::JoinHandle<()>> {
    let until = Instant::now() + Duration::from_secs(60);
    let loads = Load::each(url, &WORKERS, &[false, true], until, on_error);
    load::spawn(loads, record)
}

/// Waits until the log shows the failpoint was hit, or `limit` passes.
async fn wait_for_log(server: &ServerProcess, needle: &str, limit: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if server.log().contains(needle) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// The server's default `--retention`.
const DEFAULT_RETENTION: Duration = Duration::from_secs(86_400);

/// The checks after failpoint `name` in `mode`: every room unique; every
/// acknowledged room younger than `retention` resolves (on `server`) to its
/// worker and dp_size (older ones may be pruned, and then say so); new
/// rooms are new.
async fn check_after(
    name: &str,
    mode: Mode,
    server: &ServerProcess,
    record: load::Record,
    retention: Duration,
) {
    let label = format!("{name} {mode:?}");
    let mut owner: HashMap<u64, (String, u32, Instant)> = HashMap::new();
    for ((room, worker, dp_size), received) in record.rooms.iter().zip(&record.received) {
        assert!(
            owner
                .insert(*room, (worker.clone(), *dp_size, *received))
                .is_none(),
            "room {room} handed out twice"
        );
    }
    let mut client = server.client().await;
    // Every acknowledged room, or a dense sample of many.
    let step = (owner.len() / 2000).max(1);
    let mut resolved_rooms = 0;
    for (room, (worker, dp_size, received)) in owner.iter().step_by(step) {
        match timed(client.resolve_rank(pb::ResolveRankRequest { room: *room })).await {
            Ok(resolved) => {
                let resolved = resolved.into_inner();
                assert_eq!(
                    (&resolved.prefill_worker, resolved.dp_size),
                    (worker, *dp_size)
                );
                resolved_rooms += 1;
            }
            Err(status)
                if received.elapsed() > retention
                    && status
                        .metadata()
                        .get("error-reason")
                        .and_then(|v| v.to_str().ok())
                        == Some("ROOM_PRUNED") => {}
            Err(status) => panic!(
                "room {room}, acknowledged {:?} ago, does not resolve: {status:?}",
                received.elapsed()
            ),
        }
    }
    assert!(
        resolved_rooms > 0 || retention < Duration::from_secs(60),
        "rooms resolve"
    );
    // Read by RELIABILITY.md's tally (`cargo test ... -- --nocapture`).
    println!(
        "failpoint {label}: {} rooms checked unique, {resolved_rooms} resolved, 0 duplicates",
        owner.len()
    );
    for (worker, dp_size) in WORKERS {
        for rank in 0..dp_size {
            let room = timed(client.allocate_room(pb::AllocateRoomRequest {
                prefill_worker: worker.into(),
                dp_rank: rank,
                dp_size,
            }))
            .await
            .expect("allocate after the fault")
            .into_inner()
            .room;
            assert!(
                !owner.contains_key(&room),
                "room {room} issued again after the fault"
            );
        }
    }
}

/// One embedded-store case: run a load with the failpoint armed, then
/// restart cleanly and check.
async fn embedded_case(name: &str, skip: u32, mode: Mode, extra: &[&str]) {
    let dir = tempfile::tempdir().expect("tempdir");
    let record = load::Shared::default();
    let mut server = ServerProcess::try_start_with(dir.path(), extra, |command| {
        command.env("FAILPOINTS", failpoints(name, skip, mode));
    })
    .unwrap_or_else(|failure| panic!("start: {}", failure.log));
    register_all(&server).await;
    let on_error = match mode {
        Mode::Fail => OnError::Continue,
        Mode::Crash => OnError::Stop,
    };
    let tasks = start_load(&server.url(), &record, on_error);
    let needle = match mode {
        Mode::Fail => format!("failpoint {name}"),
        Mode::Crash => format!("failpoint {name}: crashing"),
    };
    let hit = wait_for_log(&server, &needle, HIT_LIMIT).await;
    assert!(hit, "failpoint {name} was never reached:\n{}", server.log());
    match mode {
        Mode::Fail => {
            // Serving goes on after the failure.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            load::stop(&record);
            assert!(server.terminate().success(), "{}", server.log());
        }
        Mode::Crash => {
            let status = server.wait_exit(Duration::from_secs(10));
            assert!(
                status.is_some_and(|s| !s.success()),
                "the process died at the failpoint"
            );
        }
    }
    let record = load::join(&record, tasks).await;
    for (code, message, _) in &record.errors {
        assert!(
            *code == Code::Unavailable || load::server_went_away(*code, message),
            "{code:?} {message}"
        );
    }
    assert!(!record.rooms.is_empty(), "the load got rooms");
    let restarted = ServerProcess::start(dir.path(), extra);
    check_after(name, mode, &restarted, record, retention_of(extra)).await;
}

/// The `--retention` in `extra`, else the default.
fn retention_of(extra: &[&str]) -> Duration {
    extra
        .iter()
        .position(|a| *a == "--retention")
        .and_then(|i| extra.get(i + 1))
        .map(|r| room_allocator::config::parse_duration(r).expect("a duration"))
        .unwrap_or(DEFAULT_RETENTION)
}

/// A fail test and a crash test of one case: `$case` runs with `$mode`
/// bound to `Mode::Fail`, then `Mode::Crash`. RELIABILITY.md's failpoint
/// table names both tests (`x_fails, x_crashes:` is how the drift test in
/// `src/failpoint.rs` finds them).
macro_rules! fail_and_crash {
    ($($fail:ident, $crash:ident: |$mode:ident| $case:expr;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $fail() {
            let $mode = Mode::Fail;
            $case.await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $crash() {
            let $mode = Mode::Crash;
            $case.await;
        }
    )*};
}

/// Compaction needs ranges older than twice the retention.
const SHORT_RETENTION: &[&str] = &["--retention", "1s"];

fail_and_crash! {
    log_write_fails, log_write_crashes: |mode| embedded_case("embedded::log_write", 8, mode, &[]);
    log_fsync_fails, log_fsync_crashes: |mode| embedded_case("embedded::log_fsync", 8, mode, &[]);
    slot_write_fails, slot_write_crashes: |mode| embedded_case("embedded::slot_write", 8, mode, &[]);
    slot_fsync_fails, slot_fsync_crashes: |mode| embedded_case("embedded::slot_fsync", 8, mode, &[]);
    commit_reply_fails, commit_reply_crashes: |mode| embedded_case("embedded::committed", 8, mode, &[]);
    compaction_write_fails, compaction_write_crashes: |mode| embedded_case("compact::write", 1, mode, SHORT_RETENTION);
    compaction_fsync_fails, compaction_fsync_crashes: |mode| embedded_case("compact::fsync", 1, mode, SHORT_RETENTION);
    compaction_rename_fails, compaction_rename_crashes: |mode| embedded_case("compact::rename", 1, mode, SHORT_RETENTION);
    compaction_dir_fsync_fails, compaction_dir_fsync_crashes: |mode| embedded_case("compact::dir_fsync", 1, mode, SHORT_RETENTION);
    compaction_slot_write_fails, compaction_slot_write_crashes: |mode| embedded_case("compact::slot_write", 1, mode, SHORT_RETENTION);
    compaction_slot_fsync_fails, compaction_slot_fsync_crashes: |mode| embedded_case("compact::slot_fsync", 1, mode, SHORT_RETENTION);
}

/// Leaves a data dir whose log holds durable records past its last commit
/// (a crash between the log fsync and the slot write), so the next start
/// settles it: cuts a torn tail and commits what it adopts.
async fn unsettled_dir() -> (tempfile::TempDir, load::Record) {
    let dir = tempfile::tempdir().expect("tempdir");
    let record = load::Shared::default();
    let mut server = ServerProcess::try_start_with(dir.path(), &[], |command| {
        command.env(
            "FAILPOINTS",
            failpoints("embedded::slot_write", 8, Mode::Crash),
        );
    })
    .unwrap_or_else(|failure| panic!("start: {}", failure.log));
    register_all(&server).await;
    let tasks = start_load(&server.url(), &record, OnError::Stop);
    assert!(server.wait_exit(HIT_LIMIT).is_some(), "crashed");
    for task in tasks {
        timed(task).await.expect("load task");
    }
    // And a torn tail past it.
    let log = dir.path().join("rooms.log");
    let mut bytes = std::fs::read(&log).expect("log");
    bytes.extend_from_slice(&[200, 0, 0, 0, 9, 9, 9]);
    std::fs::write(&log, bytes).expect("write");
    let record = load::take(&record);
    (dir, record)
}

async fn settle_case(name: &str, mode: Mode) {
    settle_case_prepared(name, mode, |_| {}).await;
}

/// [`settle_case`] on the unsettled dir after `prepare` changed it.
async fn settle_case_prepared(name: &str, mode: Mode, prepare: fn(&std::path::Path)) {
    let (dir, record) = unsettled_dir().await;
    prepare(dir.path());
    let armed = ServerProcess::try_start_with(dir.path(), &[], |command| {
        command.env("FAILPOINTS", failpoints(name, 0, mode));
    });
    let Err(failure) = armed else {
        panic!("the start that settles the files went through {name}");
    };
    match mode {
        Mode::Fail => assert!(
            failure.log.contains(&format!("failpoint {name}"))
                && failure.log.contains("--data-dir"),
            "a refusal naming the flag and the step:\n{}",
            failure.log
        ),
        Mode::Crash => assert!(failure.log.contains("crashing"), "{}", failure.log),
    }
    let restarted = ServerProcess::start(dir.path(), &[]);
    check_after(name, mode, &restarted, record, DEFAULT_RETENTION).await;
}

fail_and_crash! {
    settle_truncate_fails, settle_truncate_crashes: |mode| settle_case("embedded::settle_truncate", mode);
    settle_commit_fails, settle_commit_crashes: |mode| settle_case("embedded::settle_commit", mode);
    settle_truncate_fsync_fails, settle_truncate_fsync_crashes: |mode| settle_case("embedded::settle_truncate_fsync", mode);
    settle_rewrite_fails, settle_rewrite_crashes: |mode| settle_case("embedded::settle_rewrite", mode);
    settle_rewrite_fsync_fails, settle_rewrite_fsync_crashes: |mode| settle_case("embedded::settle_rewrite_fsync", mode);
    settle_dir_fsync_fails, settle_dir_fsync_crashes: |mode| settle_case("embedded::settle_dir_fsync", mode);
    settle_commit_fsync_fails, settle_commit_fsync_crashes: |mode| settle_case("embedded::settle_commit_fsync", mode);
}

/// A compaction that died before its rename: its file is left over.
fn leave_a_compaction_file(dir: &std::path::Path) {
    std::fs::write(dir.join("rooms.log.compact"), b"a compaction cut short").expect("write");
}

/// Rewrites the commit file in the first format (version 1: both slots in
/// the first 1 KiB, 512 bytes apart), as releases before issue 16 wrote it,
/// so the next start upgrades it.
fn make_the_commit_file_old_format(dir: &std::path::Path) {
    let path = dir.join("rooms.commit");
    let new = std::fs::read(&path).expect("commit");
    assert_eq!(new.len(), 8192, "a version-2 commit file");
    let mut old = vec![0u8; 1024];
    for (from, to) in [(0usize, 0usize), (4096, 512)] {
        let mut slot = new[from..from + 36].to_vec();
        if slot[32..36] != crc32fast::hash(&slot[..32]).to_le_bytes() {
            continue;
        }
        slot[8..12].copy_from_slice(&1u32.to_le_bytes());
        let crc = crc32fast::hash(&slot[..32]);
        slot[32..36].copy_from_slice(&crc.to_le_bytes());
        old[to..to + 36].copy_from_slice(&slot);
    }
    std::fs::write(&path, old).expect("write");
}

fail_and_crash! {
    remove_compact_fails, remove_compact_crashes: |mode| settle_case_prepared("embedded::remove_compact", mode, leave_a_compaction_file);
    upgrade_write_fails, upgrade_write_crashes: |mode| settle_case_prepared("embedded::upgrade_write", mode, make_the_commit_file_old_format);
    upgrade_fsync_fails, upgrade_fsync_crashes: |mode| settle_case_prepared("embedded::upgrade_fsync", mode, make_the_commit_file_old_format);
    upgrade_rename_fails, upgrade_rename_crashes: |mode| settle_case_prepared("embedded::upgrade_rename", mode, make_the_commit_file_old_format);
    upgrade_dir_fsync_fails, upgrade_dir_fsync_crashes: |mode| settle_case_prepared("embedded::upgrade_dir_fsync", mode, make_the_commit_file_old_format);
}

/// A first start, in a data dir whose parent is missing too, meets the
/// failpoint; the next start sets the store up and serves.
async fn first_start_case(name: &str, mode: Mode) {
    let root = tempfile::tempdir().expect("tempdir");
    let dir = root.path().join("volume").join("data");
    let armed = ServerProcess::try_start_with(&dir, &[], |command| {
        command.env("FAILPOINTS", failpoints(name, 0, mode));
    });
    let Err(failure) = armed else {
        panic!("the first start went through {name}");
    };
    match mode {
        Mode::Fail => assert!(
            failure.log.contains(&format!("failpoint {name}"))
                && failure.log.contains("--data-dir"),
            "a refusal naming the flag and the step:\n{}",
            failure.log
        ),
        Mode::Crash => assert!(failure.log.contains("crashing"), "{}", failure.log),
    }
    let server = ServerProcess::start(&dir, &[]);
    register_all(&server).await;
    let record = load::Shared::default();
    let tasks = start_load(&server.url(), &record, OnError::Stop);
    tokio::time::sleep(Duration::from_millis(300)).await;
    load::stop(&record);
    let record = load::join(&record, tasks).await;
    assert!(!record.rooms.is_empty(), "the store serves after {name}");
    check_after(name, mode, &server, record, DEFAULT_RETENTION).await;
}

fail_and_crash! {
    create_dir_fails, create_dir_crashes: |mode| first_start_case("embedded::create_dir", mode);
    create_dir_sync_fails, create_dir_sync_crashes: |mode| first_start_case("embedded::create_dir_sync", mode);
    first_start_sync_parents_fails, first_start_sync_parents_crashes: |mode| first_start_case("embedded::first_start_sync_parents", mode);
    first_start_log_fails, first_start_log_crashes: |mode| first_start_case("embedded::first_start_log", mode);
    first_start_log_fsync_fails, first_start_log_fsync_crashes: |mode| first_start_case("embedded::first_start_log_fsync", mode);
    first_start_commit_fails, first_start_commit_crashes: |mode| first_start_case("embedded::first_start_commit", mode);
    first_start_commit_fsync_fails, first_start_commit_fsync_crashes: |mode| first_start_case("embedded::first_start_commit_fsync", mode);
    first_start_rename_fails, first_start_rename_crashes: |mode| first_start_case("embedded::first_start_rename", mode);
    first_start_dir_fsync_fails, first_start_dir_fsync_crashes: |mode| first_start_case("embedded::first_start_dir_fsync", mode);
}

/// One etcd case: replica A has the failpoint, replica B none; loads on
/// both; then A restarts cleanly and B checks everything.
async fn etcd_case(name: &str, skip: u32, mode: Mode) {
    let Some(etcd) = EtcdProcess::start() else {
        return;
    };
    let prefix = common::unique_prefix(&name.replace("::", "-"));
    let args = ["--etcd-endpoints", &etcd.endpoint, "--etcd-prefix", &prefix];
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = ServerProcess::try_start_with(&dir.path().join("a"), &args, |command| {
        command.env("FAILPOINTS", failpoints(name, skip, mode));
    })
    .unwrap_or_else(|failure| panic!("start A: {}", failure.log));
    let b = ServerProcess::start(&dir.path().join("b"), &args);
    register_all(&b).await;
    let record = load::Shared::default();
    let on_error = match mode {
        Mode::Fail => OnError::Continue,
        Mode::Crash => OnError::Stop,
    };
    let mut tasks = start_load(&a.url(), &record, on_error);
    tasks.extend(start_load(&b.url(), &record, OnError::Continue));
    let needle = match mode {
        Mode::Fail => format!("failpoint {name}"),
        Mode::Crash => format!("failpoint {name}: crashing"),
    };
    // Registrations and realignments on A (etcd::registered) and on B; each
    // reaches A's watch (allocator::apply_update). A may fail or die here.
    // A may already be gone: connect lazily.
    let mut on_a = a.lazy_client();
    let mut on_b = b.client().await;
    for dp_size in [2, 4, 2] {
        let request = pb::RegisterWorkerRequest {
            prefill_worker: "fp-realigned".into(),
            dp_size,
        };
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            on_a.register_worker(request.clone()),
        )
        .await;
        timed(on_b.register_worker(request))
            .await
            .expect("register on B");
    }
    let hit = wait_for_log(&a, &needle, HIT_LIMIT).await;
    assert!(hit, "failpoint {name} was never reached:\n{}", a.log());
    match mode {
        Mode::Fail => {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            assert!(a.terminate().success(), "{}", a.log());
        }
        Mode::Crash => {
            assert!(a.wait_exit(Duration::from_secs(10)).is_some(), "A died");
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    load::stop(&record);
    let mut b = b;
    assert!(b.terminate().success());
    let record = load::join(&record, tasks).await;
    for (code, message, _) in &record.errors {
        assert!(
            *code == Code::Unavailable || load::server_went_away(*code, message),
            "{code:?} {message}"
        );
    }
    let checker = ServerProcess::start(&dir.path().join("c"), &args);
    check_after(name, mode, &checker, record, DEFAULT_RETENTION).await;
}

fail_and_crash! {
    etcd_reserve_send_fails, etcd_reserve_send_crashes: |mode| etcd_case("etcd::reserve_send", 2, mode);
    etcd_chunk_send_fails, etcd_chunk_send_crashes: |mode| etcd_case("etcd::chunk_send", 0, mode);
    etcd_chunk_committed_fails, etcd_chunk_committed_crashes: |mode| etcd_case("etcd::chunk_committed", 0, mode);
    etcd_reserve_committed_fails, etcd_reserve_committed_crashes: |mode| etcd_case("etcd::reserve_committed", 2, mode);
    etcd_lease_grant_fails, etcd_lease_grant_crashes: |mode| etcd_case("etcd::lease_granted", 0, mode);
    etcd_registration_reply_fails, etcd_registration_reply_crashes: |mode| etcd_case("etcd::registered", 0, mode);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_watch_event_apply_crashes() {
    etcd_case("allocator::apply_update", 0, Mode::Crash).await;
}

/// Applying a watch event is never "failed" (the watch delivers in order or
/// breaks); it can be slow. Here every event waits 1.5 s before it applies
/// (an async wait: a blocking sleep stalled A's runtime threads too, and
/// under load its reservations ran past the store timeout).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_watch_events_applied_late_never_give_a_misaligned_room() {
    let Some(etcd) = EtcdProcess::start() else {
        return;
    };
    let prefix = common::unique_prefix("late-watch");
    let args = ["--etcd-endpoints", &etcd.endpoint, "--etcd-prefix", &prefix];
    let dir = tempfile::tempdir().expect("tempdir");
    let a = ServerProcess::try_start_with(&dir.path().join("a"), &args, |command| {
        command.env("FAILPOINTS", "allocator::apply_update_late=return(1500)");
    })
    .unwrap_or_else(|failure| panic!("start A: {}", failure.log));
    let b = ServerProcess::start(&dir.path().join("b"), &args);
    let (mut on_a, mut on_b) = (a.client().await, b.client().await);
    let register = |dp_size| pb::RegisterWorkerRequest {
        prefill_worker: "late".into(),
        dp_size,
    };
    timed(on_b.register_worker(register(4)))
        .await
        .expect("register");
    let mut rooms = HashMap::new();
    for round in 0..6u32 {
        let dp_size = [4, 8, 3][round as usize % 3];
        timed(on_b.register_worker(register(dp_size)))
            .await
            .expect("realign on B");
        // A has not applied the change yet: a router that knows the new size
        // gets it (A asks etcd), one that passes 0 gets whatever A serves,
        // always aligned to the size the response states.
        for rank in 0..dp_size {
            let response = timed(on_a.allocate_room(pb::AllocateRoomRequest {
                prefill_worker: "late".into(),
                dp_rank: rank,
                dp_size,
            }))
            .await
            .expect("allocate with the new dp_size on A")
            .into_inner();
            assert_eq!(response.dp_size, dp_size);
            assert_eq!(response.room % u64::from(dp_size), u64::from(rank));
            assert!(rooms.insert(response.room, dp_size).is_none());
        }
    }
    for (room, dp_size) in rooms {
        let resolved = timed(on_b.resolve_rank(pb::ResolveRankRequest { room }))
            .await
            .expect("resolve")
            .into_inner();
        assert_eq!(resolved.dp_size, dp_size);
    }
}

/// One migrate case: an embedded server issues rooms; migrate meets the
/// failpoint; the data dir never serves again once anything was copied;
/// a rerun finishes; etcd replicas issue only new rooms.
async fn migrate_case(name: &str, mode: Mode) {
    let Some(etcd) = EtcdProcess::start() else {
        return;
    };
    let prefix = common::unique_prefix(&name.replace("::", "-"));
    let dir = tempfile::tempdir().expect("tempdir");
    let record = load::Shared::default();
    {
        let mut embedded = ServerProcess::start(dir.path(), &[]);
        register_all(&embedded).await;
        let tasks = start_load(&embedded.url(), &record, OnError::Stop);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(embedded.terminate().success());
        for task in tasks {
            timed(task).await.expect("load task");
        }
    }
    let data_dir = dir.path().to_str().expect("utf-8");
    let args = [
        "migrate",
        "--data-dir",
        data_dir,
        "--etcd-endpoints",
        &etcd.endpoint,
        "--etcd-prefix",
        &prefix,
    ];
    let (code, _, err) = run_cli_env(&args, &[("FAILPOINTS", &failpoints(name, 0, mode))]);
    assert_ne!(code, 0, "migrate went through {name}");
    assert!(err.contains(name), "{err}");
    // Before its rename the mark is not there; after it, it is.
    let marked = !name.starts_with("migrate::mark") || name == "migrate::mark_dir_fsync";
    let served = ServerProcess::try_start(dir.path(), &[]);
    match served {
        Ok(mut server) => {
            assert!(!marked, "served a data dir whose rooms went to etcd");
            // Nothing was copied: the dir may still serve; stop it again.
            assert!(server.terminate().success());
        }
        Err(failure) => {
            assert!(marked, "{}", failure.log);
            assert!(failure.log.contains("migrated to etcd"), "{}", failure.log);
        }
    }
    let (code, _, err) = run_cli_env(&args, &[]);
    assert_eq!(code, 0, "the rerun finishes: {err}");
    let record = load::take(&record);
    let replica = ServerProcess::start(
        &dir.path().join("replica"),
        &["--etcd-endpoints", &etcd.endpoint, "--etcd-prefix", &prefix],
    );
    check_after(name, mode, &replica, record, DEFAULT_RETENTION).await;
}

fail_and_crash! {
    migrate_mark_fails, migrate_mark_crashes: |mode| migrate_case("migrate::mark", mode);
    migrate_mark_write_fails, migrate_mark_write_crashes: |mode| migrate_case("migrate::mark_write", mode);
    migrate_mark_fsync_fails, migrate_mark_fsync_crashes: |mode| migrate_case("migrate::mark_fsync", mode);
    migrate_mark_rename_fails, migrate_mark_rename_crashes: |mode| migrate_case("migrate::mark_rename", mode);
    migrate_mark_dir_fsync_fails, migrate_mark_dir_fsync_crashes: |mode| migrate_case("migrate::mark_dir_fsync", mode);
    migrate_high_water_fails, migrate_high_water_crashes: |mode| migrate_case("migrate::high_water", mode);
    // The mark swap's send side: the data dir is marked, nothing reached etcd.
    migrate_high_water_send_fails, migrate_high_water_send_crashes: |mode| migrate_case("migrate::high_water_send", mode);
    // After the lease for the copied ranges was granted, before any range.
    migrate_lease_granted_fails, migrate_lease_granted_crashes: |mode| migrate_case("migrate::lease_granted", mode);
    migrate_ranges_fails, migrate_ranges_crashes: |mode| migrate_case("migrate::ranges", mode);
}

async fn lease_mu(
    server: &ServerProcess,
) -> Result<tonic::Response<pb::LeaseRoomsResponse>, tonic::Status> {
    timed(server.client().await.lease_rooms(pb::LeaseRoomsRequest {
        prefill_worker: "mu".into(),
        count: 1000,
        dp_size: 1,
    }))
    .await
}

/// RELIABILITY.md defect 16: after a chunk transaction of unknown outcome a
/// replica rereads the mark outside any compare-and-swap. If it never saw a
/// higher mark, and the chunk announcements are gone, only the swap's
/// compare "no range at or above the mark" keeps a mark rewritten down from
/// giving it a chunk over rooms already issued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mark_rewritten_down_after_a_chunk_of_unknown_outcome_is_refused() {
    let Some(etcd) = EtcdProcess::start() else {
        return;
    };
    let prefix = common::unique_prefix("mark-after-unknown");
    let args = ["--etcd-endpoints", &etcd.endpoint, "--etcd-prefix", &prefix];
    let dir = tempfile::tempdir().expect("tempdir");
    let a = ServerProcess::start(&dir.path().join("a"), &args);
    let b = ServerProcess::try_start_with(&dir.path().join("b"), &args, |command| {
        command.env("FAILPOINTS", failpoints("etcd::chunk_send", 0, Mode::Fail));
    })
    .unwrap_or_else(|failure| panic!("start B: {}", failure.log));
    timed(a.client().await.register_worker(pb::RegisterWorkerRequest {
        prefill_worker: "mu".into(),
        dp_size: 1,
    }))
    .await
    .expect("register");
    let first = lease_mu(&a).await.expect("lease on A").into_inner();
    etcd.delete_under(&format!("{prefix}v1/chunks/")).await;
    etcd.put(&format!("{prefix}v1/high_water"), "1").await;
    // B's first chunk fails before it is sent (unknown to B whether it
    // landed); its next attempts reread the mark.
    let mut refused_by_name = false;
    for _ in 0..3 {
        match lease_mu(&b).await {
            Ok(lease) => panic!(
                "B leased {}.. after the mark was rewritten to 1; A's lease was {}..",
                lease.into_inner().first_base,
                first.first_base
            ),
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                refused_by_name |= status.message().contains("high_water");
            }
        }
    }
    assert!(refused_by_name, "B never named the mark:\n{}", b.log());
}
fail_and_crash! {
    etcd_register_send_fails, etcd_register_send_crashes: |mode| etcd_case("etcd::register_send", 0, mode);
}

/// The failpoint `name` on a replica that must fail to start there, or
/// die: the log says so.
fn assert_stopped_at(result: Result<ServerProcess, common::StartFailure>, name: &str, mode: Mode) {
    let Err(failure) = result else {
        panic!("the start went through {name}");
    };
    let needle = match mode {
        Mode::Fail => format!("failpoint {name}"),
        Mode::Crash => format!("failpoint {name}: crashing"),
    };
    assert!(failure.log.contains(&needle), "{}", failure.log);
}

/// A replica's first start on a new prefix fails (or dies) at a step that
/// wrote to etcd; the next start completes the set-up, and rooms are unique.
async fn etcd_first_start_case(name: &str, mode: Mode) {
    let Some(etcd) = EtcdProcess::start() else {
        return;
    };
    let prefix = common::unique_prefix(&name.replace("::", "-"));
    let args = ["--etcd-endpoints", &etcd.endpoint, "--etcd-prefix", &prefix];
    let dir = tempfile::tempdir().expect("tempdir");
    let armed = ServerProcess::try_start_with(&dir.path().join("a"), &args, |command| {
        command.env("FAILPOINTS", failpoints(name, 0, mode));
    });
    assert_stopped_at(armed, name, mode);
    let b = ServerProcess::start(&dir.path().join("b"), &args);
    register_all(&b).await;
    let record = load::Shared::default();
    let tasks = start_load(&b.url(), &record, OnError::Continue);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    load::stop(&record);
    for task in tasks {
        timed(task).await.expect("load task");
    }
    for key in ["high_water", "config/retention_ms"] {
        assert!(
            etcd.get(&format!("{prefix}v1/{key}")).await.is_some(),
            "{key} is set up"
        );
    }
    let record = load::take(&record);
    assert!(!record.rooms.is_empty(), "the load got rooms");
    check_after(name, mode, &b, record, DEFAULT_RETENTION).await;
}

fail_and_crash! {
    etcd_high_water_created_fails, etcd_high_water_created_crashes: |mode| etcd_first_start_case("etcd::high_water_created", mode);
    etcd_fleet_retention_written_fails, etcd_fleet_retention_written_crashes: |mode| etcd_first_start_case("etcd::fleet_retention_written", mode);
}

/// rooms_issued is written as a replica shuts down: the write fails (or the
/// process dies) after etcd took it; rooms stay unique after a restart.
async fn etcd_issued_case(mode: Mode) {
    let name = "etcd::issued_written";
    let Some(etcd) = EtcdProcess::start() else {
        return;
    };
    let prefix = common::unique_prefix("issued-written");
    let args = ["--etcd-endpoints", &etcd.endpoint, "--etcd-prefix", &prefix];
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = ServerProcess::try_start_with(&dir.path().join("a"), &args, |command| {
        command.env("FAILPOINTS", failpoints(name, 0, mode));
    })
    .unwrap_or_else(|failure| panic!("start A: {}", failure.log));
    register_all(&a).await;
    let record = load::Shared::default();
    let tasks = start_load(&a.url(), &record, OnError::Continue);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    load::stop(&record);
    for task in tasks {
        timed(task).await.expect("load task");
    }
    let status = a.terminate();
    let needle = match mode {
        Mode::Fail => format!("failpoint {name}"),
        Mode::Crash => format!("failpoint {name}: crashing"),
    };
    assert!(a.log().contains(&needle), "{status:?}\n{}", a.log());
    let record = load::take(&record);
    assert!(!record.rooms.is_empty(), "the load got rooms");
    let checker = ServerProcess::start(&dir.path().join("c"), &args);
    check_after(name, mode, &checker, record, DEFAULT_RETENTION).await;
}

fail_and_crash! {
    etcd_issued_written_fails, etcd_issued_written_crashes: |mode| etcd_issued_case(mode);
}

/// A deregistration fails (or its replica dies) after etcd took it, through
/// a replica that read a short retention while the worker's ranges were
/// reserved under a long one; deregistering again through a clean replica
/// leaves a record that outlives every range of the worker.
async fn etcd_deregister_case(name: &str, mode: Mode) {
    let Some(etcd) = EtcdProcess::start() else {
        return;
    };
    let prefix = common::unique_prefix(&name.replace("::", "-"));
    let args = ["--etcd-endpoints", &etcd.endpoint, "--etcd-prefix", &prefix];
    let dir = tempfile::tempdir().expect("tempdir");
    let long = ServerProcess::start(
        &dir.path().join("long"),
        &[&args[..], &["--retention", "1h"]].concat(),
    );
    let leaving = pb::RegisterWorkerRequest {
        prefill_worker: "fp-leaving".into(),
        dp_size: 2,
    };
    timed(long.client().await.register_worker(leaving.clone()))
        .await
        .expect("register");
    let room = timed(long.client().await.allocate_room(pb::AllocateRoomRequest {
        prefill_worker: "fp-leaving".into(),
        dp_rank: 1,
        dp_size: 2,
    }))
    .await
    .expect("allocate")
    .into_inner()
    .room;
    let set = common::run_cli(&[
        "retention",
        "--etcd-endpoints",
        &etcd.endpoint,
        "--etcd-prefix",
        &prefix,
        "--set",
        "10s",
    ]);
    assert_eq!(set.0, 0, "{}", set.2);
    let mut short = ServerProcess::try_start_with(&dir.path().join("short"), &args, |command| {
        command.env("FAILPOINTS", failpoints(name, 0, mode));
    })
    .unwrap_or_else(|failure| panic!("start: {}", failure.log));
    let deregister = pb::DeregisterWorkerRequest {
        prefill_worker: "fp-leaving".into(),
    };
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        short.lazy_client().deregister_worker(deregister.clone()),
    )
    .await;
    match mode {
        Mode::Fail => {
            let status = answer.expect("an answer").expect_err("the step failed");
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            assert!(short.terminate().success(), "{}", short.log());
        }
        Mode::Crash => {
            assert!(short.wait_exit(Duration::from_secs(10)).is_some(), "died");
            assert!(short.log().contains("crashing"), "{}", short.log());
        }
    }
    // The caller retries elsewhere.
    let clean = ServerProcess::start(&dir.path().join("clean"), &args);
    timed(clean.client().await.deregister_worker(deregister))
        .await
        .expect("deregister again");
    let range_ttl = etcd.longest_range_ttl(&prefix, "fp-leaving").await;
    let worker = etcd
        .get(&format!("{prefix}v1/workers/fp-leaving"))
        .await
        .expect("the record");
    let worker_ttl = etcd.lease_ttl(&worker).await;
    assert!(
        range_ttl > 3600 && worker_ttl >= range_ttl,
        "record TTL {worker_ttl} s, range TTL {range_ttl} s"
    );
    let resolved = timed(
        clean
            .client()
            .await
            .resolve_rank(pb::ResolveRankRequest { room }),
    )
    .await
    .expect("resolve")
    .into_inner();
    assert_eq!(
        (resolved.prefill_worker.as_str(), resolved.dp_size),
        ("fp-leaving", 2)
    );
    println!("failpoint {name} {mode:?}: record TTL {worker_ttl} s >= range TTL {range_ttl} s");
}

fail_and_crash! {
    etcd_deregistered_fails, etcd_deregistered_crashes: |mode| etcd_deregister_case("etcd::deregistered", mode);
}

/// A range is reserved for the worker, under a long retention, between
/// the deregistration's read of the worker's range leases and its write
/// (the `etcd::deregister_send` failpoint holds the write back), then the
/// deregistration fails (or its replica dies) after etcd took the write,
/// before its second look: the record is left with the short lease. The
/// caller's retry, through a clean replica, finds the worker deregistered
/// and must still leave a record that outlives every range of the worker
/// (defect 41: the retry was a no-op).
async fn etcd_deregister_late_range_case(mode: Mode) {
    let Some(etcd) = EtcdProcess::start() else {
        return;
    };
    let prefix = common::unique_prefix("etcd-deregistered-late-range");
    let args = ["--etcd-endpoints", &etcd.endpoint, "--etcd-prefix", &prefix];
    let dir = tempfile::tempdir().expect("tempdir");
    let long = ServerProcess::start(
        &dir.path().join("long"),
        &[&args[..], &["--retention", "1h"]].concat(),
    );
    timed(
        long.client()
            .await
            .register_worker(pb::RegisterWorkerRequest {
                prefill_worker: "fp-late".into(),
                dp_size: 2,
            }),
    )
    .await
    .expect("register");
    let set = common::run_cli(&[
        "retention",
        "--etcd-endpoints",
        &etcd.endpoint,
        "--etcd-prefix",
        &prefix,
        "--set",
        "10s",
    ]);
    assert_eq!(set.0, 0, "{}", set.2);
    // The write waits 6 s after the read and the grant; then the step
    // after it fails (or dies).
    let after_write = match mode {
        Mode::Fail => "1*return->off",
        Mode::Crash => "return(crash)",
    };
    let mut short = ServerProcess::try_start_with(&dir.path().join("short"), &args, |command| {
        command.env(
            "FAILPOINTS",
            format!("etcd::deregister_send=1*sleep(6000)->off;etcd::deregistered={after_write}"),
        );
    })
    .unwrap_or_else(|failure| panic!("start: {}", failure.log));
    let deregister = pb::DeregisterWorkerRequest {
        prefill_worker: "fp-late".into(),
    };
    let mut short_client = short.lazy_client();
    let first = tokio::spawn({
        let deregister = deregister.clone();
        async move {
            tokio::time::timeout(
                Duration::from_secs(20),
                short_client.deregister_worker(deregister),
            )
            .await
        }
    });
    // Well inside the 6 s the write is held back: the read and the grant
    // are done, the write is not.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let room = timed(long.client().await.allocate_room(pb::AllocateRoomRequest {
        prefill_worker: "fp-late".into(),
        dp_rank: 1,
        dp_size: 2,
    }))
    .await
    .expect("allocate between the deregistration's read and its write")
    .into_inner()
    .room;
    let answer = first.await.expect("the first deregistration's task");
    match mode {
        Mode::Fail => {
            let status = answer.expect("an answer").expect_err("the step failed");
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            assert!(short.terminate().success(), "{}", short.log());
        }
        Mode::Crash => {
            assert!(short.wait_exit(Duration::from_secs(10)).is_some(), "died");
            assert!(short.log().contains("crashing"), "{}", short.log());
        }
    }
    let worker_key = format!("{prefix}v1/workers/fp-late");
    let written = etcd.get(&worker_key).await.expect("the record written");
    let first_ttl = etcd.lease_ttl(&written).await;
    // The caller retries elsewhere.
    let clean = ServerProcess::start(&dir.path().join("clean"), &args);
    timed(clean.client().await.deregister_worker(deregister))
        .await
        .expect("deregister again");
    let range_ttl = etcd.longest_range_ttl(&prefix, "fp-late").await;
    assert!(
        range_ttl > 3600,
        "the late range lives by the long retention: {range_ttl} s"
    );
    let worker = etcd.get(&worker_key).await.expect("the record");
    let worker_ttl = etcd.lease_ttl(&worker).await;
    assert!(
        worker_ttl >= range_ttl,
        "after the retry the record expires before its range: record TTL {worker_ttl} s \
         (after the first attempt {first_ttl} s), range TTL {range_ttl} s"
    );
    let resolved = timed(
        clean
            .client()
            .await
            .resolve_rank(pb::ResolveRankRequest { room }),
    )
    .await
    .expect("resolve")
    .into_inner();
    assert_eq!(
        (resolved.prefill_worker.as_str(), resolved.dp_size),
        ("fp-late", 2)
    );
    println!(
        "late range, {mode:?}: record TTL {first_ttl} s after the first attempt, \
         {worker_ttl} s after the retry >= range TTL {range_ttl} s"
    );
}

fail_and_crash! {
    etcd_deregistered_after_a_late_range_fails, etcd_deregistered_after_a_late_range_crashes: |mode| etcd_deregister_late_range_case(mode);
}

/// `retention --set` fails (or dies) after etcd took the new value: the
/// tool exits non-zero, and showing the retention tells what etcd holds.
async fn etcd_retention_set_case(mode: Mode) {
    let name = "etcd::retention_set";
    let Some(etcd) = EtcdProcess::start() else {
        return;
    };
    let prefix = common::unique_prefix("retention-set");
    let base = [
        "retention",
        "--etcd-endpoints",
        &etcd.endpoint,
        "--etcd-prefix",
        &prefix,
    ];
    let (code, _, err) = run_cli_env(
        &[&base[..], &["--set", "2h"]].concat(),
        &[("FAILPOINTS", &failpoints(name, 0, mode))],
    );
    assert_ne!(code, 0, "{err}");
    match mode {
        Mode::Fail => assert!(err.contains(&format!("failpoint {name}")), "{err}"),
        Mode::Crash => assert!(err.contains("crashing"), "{err}"),
    }
    let (code, out, err) = common::run_cli(&base);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"retention_secs\":7200"), "{out}");
    let (code, _, err) = common::run_cli(&[&base[..], &["--set", "2h"]].concat());
    assert_eq!(code, 0, "setting it again: {err}");
}

fail_and_crash! {
    etcd_retention_set_fails, etcd_retention_set_crashes: |mode| etcd_retention_set_case(mode);
}

/// A range record written without a lease (by a 0.1 replica) is attached to
/// one; the attaching transaction fails (or the replica dies) after etcd
/// took it: the record still ends up leased, and still resolves.
async fn etcd_range_leased_case(mode: Mode) {
    let name = "etcd::range_leased";
    let Some(etcd) = EtcdProcess::start() else {
        return;
    };
    let prefix = common::unique_prefix("range-leased");
    let args = ["--etcd-endpoints", &etcd.endpoint, "--etcd-prefix", &prefix];
    let key = format!("{prefix}v1/ranges/{:020}", 1000);
    etcd.put(&format!("{prefix}v1/high_water"), "2000").await;
    etcd.put(
        &key,
        r#"{"end":1010,"dp_size":1,"prefill_worker":"fp-old","created_unix_ms":1}"#,
    )
    .await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut armed = ServerProcess::try_start_with(&dir.path().join("a"), &args, |command| {
        command.env("FAILPOINTS", failpoints(name, 0, mode));
    })
    .unwrap_or_else(|failure| panic!("start: {}", failure.log));
    let needle = match mode {
        Mode::Fail => format!("failpoint {name}"),
        Mode::Crash => format!("failpoint {name}: crashing"),
    };
    assert!(
        wait_for_log(&armed, &needle, Duration::from_secs(10)).await,
        "{}",
        armed.log()
    );
    let server = match mode {
        // It retries in 5 s.
        Mode::Fail => armed,
        Mode::Crash => {
            assert!(armed.wait_exit(Duration::from_secs(10)).is_some(), "died");
            ServerProcess::start(&dir.path().join("b"), &args)
        }
    };
    let started = Instant::now();
    loop {
        let kv = etcd.get(&key).await.expect("the range record");
        if kv.lease != 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the record never got a lease"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let resolved = timed(
        server
            .client()
            .await
            .resolve_rank(pb::ResolveRankRequest { room: 1003 }),
    )
    .await
    .expect("resolve")
    .into_inner();
    assert_eq!(resolved.prefill_worker, "fp-old");
}

fail_and_crash! {
    etcd_range_leased_fails, etcd_range_leased_crashes: |mode| etcd_range_leased_case(mode);
    etcd_deregister_send_fails, etcd_deregister_send_crashes: |mode| etcd_deregister_case("etcd::deregister_send", mode);
}

/// A range reserved for a worker while its deregistration is on its way
/// (after the deregistering replica read the worker's range leases, before
/// it wrote), by a replica with a longer retention than any seen: the
/// record still outlives it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_range_reserved_while_its_worker_is_deregistered_never_outlives_the_record() {
    let Some(etcd) = EtcdProcess::start() else {
        return;
    };
    let prefix = common::unique_prefix("deregister-race");
    let args = ["--etcd-endpoints", &etcd.endpoint, "--etcd-prefix", &prefix];
    let retention = |value: &str| {
        let (code, _, err) = common::run_cli(&[
            "retention",
            "--etcd-endpoints",
            &etcd.endpoint,
            "--etcd-prefix",
            &prefix,
            "--set",
            value,
        ]);
        assert_eq!(code, 0, "{err}");
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let hour = ServerProcess::start(
        &dir.path().join("hour"),
        &[&args[..], &["--retention", "1h"]].concat(),
    );
    timed(
        hour.client()
            .await
            .register_worker(pb::RegisterWorkerRequest {
                prefill_worker: "racing".into(),
                dp_size: 1,
            }),
    )
    .await
    .expect("register");
    let lease = |count| pb::LeaseRoomsRequest {
        prefill_worker: "racing".into(),
        count,
        dp_size: 1,
    };
    timed(hour.client().await.lease_rooms(lease(1)))
        .await
        .expect("a range under 1 h");
    retention("2h");
    let two_hours = ServerProcess::start(&dir.path().join("two-hours"), &args);
    retention("10s");
    // The deregistering replica stalls between its read and its write.
    let short = ServerProcess::try_start_with(&dir.path().join("short"), &args, |command| {
        command.env("FAILPOINTS", "etcd::deregister_send=sleep(3000)");
    })
    .unwrap_or_else(|failure| panic!("start: {}", failure.log));
    let mut on_short = short.client().await;
    let deregistration = tokio::spawn(async move {
        on_short
            .deregister_worker(pb::DeregisterWorkerRequest {
                prefill_worker: "racing".into(),
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(1000)).await;
    timed(two_hours.client().await.lease_rooms(lease(1)))
        .await
        .expect("a range under 2 h, before the deregistration is written");
    timed(deregistration)
        .await
        .expect("join")
        .expect("deregister");
    let mut range_ttl = 0;
    for kv in etcd.read_under(&format!("{prefix}v1/ranges/")).await {
        range_ttl = range_ttl.max(etcd.lease_ttl(&kv).await);
    }
    let worker = etcd
        .get(&format!("{prefix}v1/workers/racing"))
        .await
        .expect("the record");
    let worker_ttl = etcd.lease_ttl(&worker).await;
    println!("deregistration race: record TTL {worker_ttl} s, longest range TTL {range_ttl} s");
    assert!(range_ttl > 7200, "the late range lives by 2 h: {range_ttl}");
    assert!(
        worker_ttl >= range_ttl,
        "the record ({worker_ttl} s) expires before a range ({range_ttl} s)"
    );
}
