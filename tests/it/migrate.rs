//! What `migrate` and `serve` do with a data dir, through the real binary:
//! `migrate` moves only an existing store that holds something (a mistyped
//! or unmounted `--data-dir` is refused and left exactly as it was, so etcd
//! never starts the room space over); `serve` creates a store only in a
//! missing or empty dir, and says so; every store carries an id that `serve`
//! logs, `migrate` reports and `/metrics` exports; and `migrate` counts every
//! number below the embedded store's high-water mark as issued, pruned ones
//! included.

use crate::common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use common::{http_get, run_cli, timed, EtcdProcess, ServerProcess};
use room_allocator::pb;
use room_allocator::space::{Bounds, DpSize};
use room_allocator::store::{EmbeddedStore, PruneRequest, Reservation, Store};

/// Every path under `dir` (recursively), or `None` if `dir` does not exist.
fn listing(dir: &Path) -> Option<BTreeSet<String>> {
    fn walk(dir: &Path, root: &Path, out: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).expect("read dir") {
            let path = entry.expect("dir entry").path();
            let meta = std::fs::metadata(&path).expect("metadata");
            out.insert(format!(
                "{} {}",
                path.strip_prefix(root).expect("under root").display(),
                meta.len()
            ));
            if meta.is_dir() {
                walk(&path, root, out);
            }
        }
    }
    if !dir.exists() {
        return None;
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    Some(out)
}

fn migrate(
    data_dir: &Path,
    etcd: &EtcdProcess,
    prefix: &str,
    extra: &[&str],
) -> (i32, String, String) {
    let mut args = vec![
        "migrate",
        "--data-dir",
        data_dir.to_str().expect("utf-8 path"),
        "--etcd-endpoints",
        &etcd.endpoint,
        "--etcd-prefix",
        prefix,
    ];
    args.extend_from_slice(extra);
    run_cli(&args)
}

/// The `store_id` field of the log line containing `message`.
fn logged_store_id(log: &str, message: &str) -> Option<String> {
    let line = log.lines().find(|line| line.contains(message))?;
    let at = line.find("store_id=")? + "store_id=".len();
    let value: String = line[at..]
        .chars()
        .take_while(|c| !c.is_whitespace())
        .collect();
    Some(value.trim_matches('"').to_owned())
}

fn is_uuid_v4(id: &str) -> bool {
    let groups: Vec<&str> = id.split('-').collect();
    groups.iter().map(|g| g.len()).collect::<Vec<_>>() == [8, 4, 4, 4, 12]
        && groups.iter().all(|g| {
            g.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        })
        && groups[2].starts_with('4')
        && matches!(groups[3].chars().next(), Some('8' | '9' | 'a' | 'b'))
}

async fn allocate(server: &ServerProcess, worker: &str, count: usize) -> Vec<u64> {
    let mut client = server.client().await;
    let mut rooms = Vec::new();
    for _ in 0..count {
        rooms.push(
            timed(client.allocate_room(pb::AllocateRoomRequest {
                prefill_worker: worker.into(),
                dp_rank: 1,
                dp_size: 2,
            }))
            .await
            .expect("allocate")
            .into_inner()
            .room,
        );
    }
    rooms
}

/// The story: an embedded server on `real/` issued rooms; `migrate`
/// with a mistyped `--data-dir` (or a dir without a store, or an empty one)
/// must refuse, create nothing and write nothing to etcd, so no replica can
/// start the space over; the real dir then migrates and reports its id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_refuses_a_dir_without_a_store_and_leaves_it_as_it_was() {
    let Some(etcd) = EtcdProcess::start() else {
        return;
    };
    let prefix = common::unique_prefix("migrate-wrong-dir");
    let top = tempfile::tempdir().expect("tempdir");
    let real = top.path().join("real");
    let issued;
    let served_log;
    {
        let mut server = ServerProcess::start(&real, &[]);
        issued = allocate(&server, "w", 3).await;
        assert!(server.terminate().success());
        served_log = server.log();
    }

    let missing = top.path().join("room-allocator-data");
    let empty = top.path().join("empty");
    std::fs::create_dir(&empty).expect("mkdir");
    let foreign = top.path().join("foreign");
    std::fs::create_dir(&foreign).expect("mkdir");
    std::fs::write(foreign.join("notes.txt"), "not a store").expect("write");
    for wrong in [&missing, &empty, &foreign] {
        let before = listing(wrong);
        let (code, out, err) = migrate(wrong, &etcd, &prefix, &[]);
        assert_ne!(code, 0, "migrated {}: {out}", wrong.display());
        assert!(
            err.contains(&wrong.display().to_string()) && err.contains("no room-allocator store"),
            "names the dir and says it holds no store: {err}"
        );
        assert_eq!(listing(wrong), before, "{} changed", wrong.display());
        // Even --allow-empty never migrates what is not a store.
        let (code, _, _) = migrate(wrong, &etcd, &prefix, &["--allow-empty"]);
        assert_ne!(code, 0);
        assert_eq!(listing(wrong), before, "{} changed", wrong.display());
    }
    assert!(
        etcd.read_under(&prefix).await.is_empty(),
        "nothing was written to etcd"
    );

    let served_id = logged_store_id(&served_log, "embedded store")
        .unwrap_or_else(|| panic!("serve logs the store id:\n{served_log}"));
    assert!(is_uuid_v4(&served_id), "{served_id}");
    let (code, out, err) = migrate(&real, &etcd, &prefix, &[]);
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert_eq!(report["store_id"], served_id.as_str(), "{report}");

    let replica_dir = tempfile::tempdir().expect("tempdir");
    let replica = ServerProcess::start(
        &replica_dir.path().join("unused"),
        &["--etcd-endpoints", &etcd.endpoint, "--etcd-prefix", &prefix],
    );
    let after = allocate(&replica, "w", 3).await;
    for room in &after {
        assert!(
            !issued.contains(room),
            "room {room} issued again: {issued:?} then {after:?}"
        );
    }
}

/// A store that holds nothing is refused unless `--allow-empty` says so:
/// an empty store where rooms were expected is the unmounted volume case.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_refuses_an_empty_store_unless_allow_empty_says_it_is_intended() {
    let Some(etcd) = EtcdProcess::start() else {
        return;
    };
    let prefix = common::unique_prefix("migrate-empty");
    let top = tempfile::tempdir().expect("tempdir");
    let dir = top.path().join("data");
    {
        let mut server = ServerProcess::start(&dir, &[]);
        assert!(server.terminate().success());
    }
    let before = listing(&dir);
    let (code, out, err) = migrate(&dir, &etcd, &prefix, &[]);
    assert_ne!(code, 0, "migrated an empty store: {out}");
    assert!(
        err.contains("--allow-empty"),
        "says how to migrate it anyway: {err}"
    );
    assert_eq!(listing(&dir), before, "the data dir changed");
    assert!(etcd.read_under(&prefix).await.is_empty(), "nothing written");

    let (code, out, err) = migrate(&dir, &etcd, &prefix, &["--allow-empty"]);
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert_eq!(report["ranges"], 0, "{report}");
}

/// `serve` creates a store only in a missing or empty dir (a lone
/// `lost+found` counts as empty), says so at WARN with the path and the new
/// id, exports the id, and keeps it across restarts; a dir with other
/// content but no store is refused and left alone. A store from before ids
/// gets one at its next start.
#[test]
fn serve_creates_a_store_only_in_an_empty_dir_and_every_store_has_an_id() {
    let top = tempfile::tempdir().expect("tempdir");

    let foreign = top.path().join("foreign");
    std::fs::create_dir(&foreign).expect("mkdir");
    std::fs::write(foreign.join("backup.tar"), "something else").expect("write");
    let before = listing(&foreign);
    let Err(failure) = ServerProcess::try_start(&foreign, &[]) else {
        panic!("served a new room space in a dir that holds something else");
    };
    assert!(
        failure.log.contains(&foreign.display().to_string())
            && failure.log.contains("no room-allocator store"),
        "{}",
        failure.log
    );
    assert_eq!(listing(&foreign), before, "the dir changed");

    let mount = top.path().join("mount");
    std::fs::create_dir_all(mount.join("lost+found")).expect("mkdir");
    let mut server = ServerProcess::start(&mount, &[]);
    let log = server.log();
    let created = log
        .lines()
        .find(|line| line.contains("WARN") && line.contains("created a new embedded store"))
        .unwrap_or_else(|| panic!("a WARN says a store was created:\n{log}"));
    assert!(created.contains(&mount.display().to_string()), "{created}");
    let id = logged_store_id(&log, "created a new embedded store").expect("the new id is logged");
    assert!(is_uuid_v4(&id), "{id}");
    let metrics = http_get(server.metrics_addr, "/metrics");
    assert!(
        metrics.contains(&format!("room_allocator_store_info{{store_id=\"{id}\"}} 1")),
        "{metrics}"
    );
    assert!(server.terminate().success());

    let mut again = ServerProcess::start(&mount, &[]);
    assert!(
        !again.log().contains("created a new embedded store"),
        "{}",
        again.log()
    );
    assert_eq!(
        logged_store_id(&again.log(), "embedded store").as_deref(),
        Some(id.as_str())
    );
    assert!(again.terminate().success());

    // A data dir from before store ids: no id file. It gets one, logged.
    let id_file = std::fs::read_dir(&mount)
        .expect("read dir")
        .map(|e| e.expect("entry").path())
        .find(|p| std::fs::read_to_string(p).is_ok_and(|text| text.trim() == id))
        .expect("the id is in a file of the data dir");
    std::fs::remove_file(&id_file).expect("remove the id file");
    let mut old = ServerProcess::start(&mount, &[]);
    let new_id =
        logged_store_id(&old.log(), "had no id").unwrap_or_else(|| panic!("{}", old.log()));
    assert!(is_uuid_v4(&new_id) && new_id != id, "{new_id}");
    assert!(old.terminate().success());
}

/// Review finding (issue 16, item 5): migrate checked etcd's chunks against
/// the embedded store's ranges only, so a chunk lying in the embedded
/// store's pruned space (rooms it issued, ranges retention dropped) passed,
/// and a replica could issue those rooms again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_refuses_a_chunk_in_the_embedded_stores_pruned_space() {
    let Some(etcd) = EtcdProcess::start() else {
        return;
    };
    let prefix = common::unique_prefix("migrate-pruned");
    let top = tempfile::tempdir().expect("tempdir");
    // A replica still running (or one whose chunk has not expired yet).
    let running = ServerProcess::start(
        &top.path().join("replica"),
        &["--etcd-endpoints", &etcd.endpoint, "--etcd-prefix", &prefix],
    );
    let first = allocate(&running, "p", 1).await[0];
    assert!(first < 1_000, "the replica's chunk starts low: {first}");
    let chunks = etcd.read_under(&format!("{prefix}v1/chunks/")).await;
    assert!(!chunks.is_empty(), "the replica announced its chunk");

    // An embedded store that issued rooms over the whole chunk, then pruned
    // that range: it holds no range, only its high-water mark.
    let dir = top.path().join("embedded");
    {
        let (store, _) = EmbeddedStore::open(&dir, Bounds::FULL).expect("open");
        let dp_size = DpSize::try_new(1).expect("dp_size");
        let worker: Arc<str> = "p".into();
        let revision = timed(store.register(worker.clone(), dp_size))
            .await
            .expect("register");
        let range = timed(store.reserve(Reservation {
            prefill_worker: worker,
            dp_size,
            revision,
            want_bases: 100_000_000,
            need_bases: 100_000_000,
            rooms_issued: 0,
            created_unix_ms: 1,
        }))
        .await
        .expect("reserve");
        assert_eq!(range.start(), 1);
        let pruned = timed(store.prune(PruneRequest {
            cutoff_unix_ms: u64::MAX,
            held: BTreeSet::new(),
        }))
        .await
        .expect("prune");
        assert_eq!(pruned.pruned_below, range.end());
        timed(store.close()).await.expect("close");
    }
    let (store, snapshot) = EmbeddedStore::open(&dir, Bounds::FULL).expect("reopen");
    assert!(
        snapshot.ranges.is_empty() && snapshot.high_water > 1_000_000,
        "{snapshot:?}"
    );
    drop(store);

    let (code, out, err) = migrate(&dir, &etcd, &prefix, &[]);
    assert_ne!(code, 0, "migrated over a chunk in the pruned space: {out}");
    assert!(
        err.contains("below the embedded store's high-water mark"),
        "says why: {err}"
    );
    assert!(
        ServerProcess::try_start(&dir, &[]).is_ok(),
        "the data dir still serves"
    );
    drop(running);
}

/// The etcd store's id: `v1/store_id`, one for every replica of a prefix,
/// exported by each, kept across restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_replicas_of_one_prefix_export_one_store_id() {
    let Some(etcd) = EtcdProcess::start() else {
        return;
    };
    let prefix = common::unique_prefix("store-id");
    let top = tempfile::tempdir().expect("tempdir");
    let replica = |name: &str| {
        ServerProcess::start(
            &top.path().join(name),
            &["--etcd-endpoints", &etcd.endpoint, "--etcd-prefix", &prefix],
        )
    };
    let exported = |server: &ServerProcess| {
        let metrics = http_get(server.metrics_addr, "/metrics");
        let at = metrics
            .find("room_allocator_store_info{store_id=\"")
            .unwrap_or_else(|| panic!("no store_info:\n{metrics}"));
        metrics[at..]
            .split('"')
            .nth(1)
            .expect("the label value")
            .to_owned()
    };
    let mut a = replica("a");
    let b = replica("b");
    let id = exported(&a);
    assert!(is_uuid_v4(&id), "{id}");
    assert_eq!(exported(&b), id);
    let stored = etcd
        .get(&format!("{prefix}v1/store_id"))
        .await
        .expect("the id is in etcd");
    assert_eq!(String::from_utf8_lossy(&stored.value), id);
    assert!(a.terminate().success());
    let again = replica("c");
    assert_eq!(exported(&again), id);
}

/// Issue 16, item 5: with no mark in etcd (deleted), `migrate` must not
/// write one below the chunks replicas took, or the next replica would
/// carve rooms a replica already leased. Since the start-up check of
/// RELIABILITY.md's defect 16 (a mark below any chunk refuses), the load
/// refuses first; import also raises any mark it writes to the highest
/// chunk or range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_never_writes_a_mark_below_a_chunk_when_etcd_has_none() {
    let Some(etcd) = EtcdProcess::start() else {
        return;
    };
    let prefix = common::unique_prefix("migrate-no-mark");
    let top = tempfile::tempdir().expect("tempdir");
    {
        let mut high = ServerProcess::start(
            &top.path().join("replica"),
            &[
                "--etcd-endpoints",
                &etcd.endpoint,
                "--etcd-prefix",
                &prefix,
                "--min-room",
                "1000000000",
            ],
        );
        allocate(&high, "n", 1).await;
        assert!(high.terminate().success());
    }
    let chunk_end = etcd
        .read_under(&format!("{prefix}v1/chunks/"))
        .await
        .iter()
        .filter_map(|kv| {
            serde_json::from_slice::<serde_json::Value>(&kv.value)
                .ok()?
                .get("end")?
                .as_u64()
        })
        .max()
        .expect("the replica announced its chunk");
    etcd.delete(&format!("{prefix}v1/high_water")).await;

    // An embedded store that issued a few rooms low in the space.
    let dir = top.path().join("embedded");
    {
        let (store, _) = EmbeddedStore::open(&dir, Bounds::FULL).expect("open");
        let dp_size = DpSize::try_new(1).expect("dp_size");
        let worker: Arc<str> = "low".into();
        let revision = timed(store.register(worker.clone(), dp_size))
            .await
            .expect("register");
        timed(store.reserve(Reservation {
            prefill_worker: worker,
            dp_size,
            revision,
            want_bases: 100,
            need_bases: 100,
            rooms_issued: 0,
            created_unix_ms: 1,
        }))
        .await
        .expect("reserve");
        timed(store.close()).await.expect("close");
    }
    let (code, _, err) = migrate(&dir, &etcd, &prefix, &[]);
    let mark = etcd.get(&format!("{prefix}v1/high_water")).await.map(|kv| {
        String::from_utf8_lossy(&kv.value)
            .trim()
            .parse::<u64>()
            .expect("a number")
    });
    match (code, mark) {
        (0, Some(mark)) => assert!(
            mark >= chunk_end,
            "migrate wrote the mark {mark} below the chunk a replica took (ending at {chunk_end})"
        ),
        (0, None) => panic!("migrate succeeded without a mark"),
        (_, Some(mark)) => panic!("migrate failed ({err}) but wrote the mark {mark}"),
        (_, None) => assert!(err.contains("high_water"), "names the missing mark: {err}"),
    }
}
