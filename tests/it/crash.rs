//! `kill -9` under load, again and again: no room is ever handed out twice,
//! every room acknowledged before a crash still resolves to its owner, and a
//! SIGTERM under load drains and exits 0.

use crate::common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::load::{self, Load, OnError};
use common::{timed, ServerProcess};
use room_allocator::pb;

const WORKERS: [(&str, u32); 3] = [("crash-dp1", 1), ("crash-dp3", 3), ("crash-dp8", 8)];
const ROUNDS: u64 = 6;

async fn register_all(server: &ServerProcess) {
    let mut client = server.client().await;
    for (worker, dp_size) in WORKERS {
        timed(client.register_worker(pb::RegisterWorkerRequest {
            prefill_worker: worker.into(),
            dp_size,
        }))
        .await
        .expect("register");
    }
}

fn start_load(
    server: &ServerProcess,
    record: &load::Shared,
    with_lease: bool,
) -> Vec<tokio::task::JoinHandle<()>> {
    let until = Instant::now() + Duration::from_secs(60);
    let url = server.url();
    let mut loads = Load::each(&url, &WORKERS, &[false], until, OnError::Stop);
    if with_lease {
        loads.extend(Load::each(
            &url,
            &WORKERS[..1],
            &[true],
            until,
            OnError::Stop,
        ));
    }
    load::spawn(loads, record)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_never_repeats_a_room_and_old_rooms_still_resolve() {
    let dir = tempfile::tempdir().expect("tempdir");
    let record = load::Shared::default();
    for round in 0..ROUNDS {
        let mut server = ServerProcess::start(dir.path(), &[]);
        register_all(&server).await;
        let tasks = start_load(&server, &record, true);
        // Kill at a different point of the load each round.
        tokio::time::sleep(Duration::from_millis(150 + 170 * round)).await;
        server.kill9();
        for task in tasks {
            timed(task).await.expect("load task");
        }
    }

    let record = load::take_after_crashes(&record, 1000);
    eprintln!(
        "{} rooms acknowledged across {ROUNDS} kill -9 rounds",
        record.rooms.len()
    );
    let mut owner: HashMap<u64, (&str, u32)> = HashMap::new();
    for (room, worker, dp_size) in &record.rooms {
        assert!(
            owner.insert(*room, (worker, *dp_size)).is_none(),
            "room {room} twice"
        );
    }

    let server = ServerProcess::start(dir.path(), &[]);
    let mut client = server.client().await;
    for (room, worker, dp_size) in record.rooms.iter().step_by(101) {
        let resolved = timed(client.resolve_rank(pb::ResolveRankRequest { room: *room }))
            .await
            .expect("old rooms resolve")
            .into_inner();
        assert_eq!(
            (&resolved.prefill_worker, resolved.dp_size),
            (worker, *dp_size)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_exits_0_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let record = load::Shared::default();
    let mut server = ServerProcess::start(dir.path(), &[]);
    register_all(&server).await;
    let tasks = start_load(&server, &record, false);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (status, log) = tokio::task::spawn_blocking(move || {
        let status = server.terminate();
        (status, server.log())
    })
    .await
    .expect("join");
    assert!(status.success(), "exit status {status:?}\n{log}");
    assert!(log.contains("store closed"), "{log}");
    for task in tasks {
        timed(task).await.expect("load task");
    }

    let record = load::take_after_crashes(&record, 1);
    let server = ServerProcess::start(dir.path(), &[]);
    let mut client = server.client().await;
    let listed = timed(client.list_workers(pb::ListWorkersRequest::default()))
        .await
        .expect("list")
        .into_inner();
    let counted: u64 = listed.workers.iter().map(|w| w.rooms_issued).sum();
    assert_eq!(
        counted,
        record.rooms.len() as u64,
        "rooms_issued persisted at shutdown"
    );
    let after = timed(client.allocate_room(pb::AllocateRoomRequest {
        prefill_worker: WORKERS[0].0.into(),
        dp_rank: 0,
        dp_size: 0,
    }))
    .await
    .expect("allocate")
    .into_inner()
    .room;
    assert!(record.rooms.iter().all(|(room, _, _)| *room != after));
}
