//! `kill -9` under load, again and again: no room is ever handed out twice,
//! every room acknowledged before a crash still resolves to its owner, and a
//! SIGTERM under load drains and exits 0.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{timed, ServerProcess};
use room_allocator::pb;
use tonic::Code;

const WORKERS: [(&str, u32); 3] = [("crash-dp1", 1), ("crash-dp3", 3), ("crash-dp8", 8)];
const ROUNDS: u64 = 6;
/// Per-task bound on calls in one round, so the load loop ends by itself.
const MAX_CALLS_PER_TASK: u32 = 200_000;

type Issued = Arc<Mutex<Vec<(u64, &'static str, u32)>>>;

/// Allocates (and leases) until the server goes away; records every room
/// whose response arrived, which is exactly what a router would have used.
async fn load(server_url: String, worker: &'static str, dp_size: u32, lease: bool, issued: Issued) {
    let Ok(mut client) =
        pb::room_allocator_service_client::RoomAllocatorServiceClient::connect(server_url).await
    else {
        return;
    };
    for call in 0..MAX_CALLS_PER_TASK {
        let rank = call % dp_size;
        let result = if lease {
            client
                .lease_rooms(pb::LeaseRoomsRequest {
                    prefill_worker: worker.into(),
                    count: 64,
                })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    (0..u64::from(r.count))
                        .map(|i| r.first_base + i * u64::from(r.dp_size) + u64::from(rank))
                        .collect::<Vec<_>>()
                })
        } else {
            client
                .allocate_room(pb::AllocateRoomRequest {
                    prefill_worker: worker.into(),
                    dp_rank: rank,
                    dp_size,
                })
                .await
                .map(|r| vec![r.into_inner().room])
        };
        match result {
            Ok(rooms) => {
                let mut issued = issued.lock().expect("lock");
                for room in rooms {
                    assert_eq!(room % u64::from(dp_size), u64::from(rank));
                    issued.push((room, worker, dp_size));
                }
            }
            Err(status) => {
                // The server went away: the connection breaks (or, on
                // SIGTERM, a call raced the GOAWAY and tonic's client reports
                // the h2 error as INTERNAL); nothing else may happen.
                let went_away = matches!(
                    status.code(),
                    Code::Unavailable | Code::Unknown | Code::Cancelled
                ) || (status.code() == Code::Internal
                    && status.message().contains("h2 protocol error"));
                assert!(went_away, "unexpected {status:?}");
                return;
            }
        }
    }
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_never_repeats_a_room_and_old_rooms_still_resolve() {
    let dir = tempfile::tempdir().expect("tempdir");
    let issued: Issued = Arc::default();
    for round in 0..ROUNDS {
        let mut server = ServerProcess::start(dir.path(), &[]);
        register_all(&server).await;
        let mut tasks = Vec::new();
        for (i, (worker, dp_size)) in WORKERS.into_iter().enumerate() {
            tasks.push(tokio::spawn(load(
                server.url(),
                worker,
                dp_size,
                false,
                issued.clone(),
            )));
            if i == 0 {
                tasks.push(tokio::spawn(load(
                    server.url(),
                    worker,
                    dp_size,
                    true,
                    issued.clone(),
                )));
            }
        }
        // Kill at a different point of the load each round.
        tokio::time::sleep(Duration::from_millis(150 + 170 * round)).await;
        server.kill9();
        for task in tasks {
            timed(task).await.expect("load task");
        }
    }

    let issued = issued.lock().expect("lock").clone();
    assert!(
        issued.len() > 1000,
        "the load produced rooms: {}",
        issued.len()
    );
    eprintln!(
        "{} rooms acknowledged across {ROUNDS} kill -9 rounds",
        issued.len()
    );
    let mut owner: HashMap<u64, (&str, u32)> = HashMap::new();
    for (room, worker, dp_size) in &issued {
        assert!(
            owner.insert(*room, (worker, *dp_size)).is_none(),
            "room {room} twice"
        );
    }

    let server = ServerProcess::start(dir.path(), &[]);
    let mut client = server.client().await;
    for (room, worker, dp_size) in issued.iter().step_by(101) {
        let resolved = timed(client.resolve_rank(pb::ResolveRankRequest { room: *room }))
            .await
            .expect("old rooms resolve")
            .into_inner();
        assert_eq!(
            (resolved.prefill_worker.as_str(), resolved.dp_size),
            (*worker, *dp_size)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_drains_exits_0_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let issued: Issued = Arc::default();
    let mut server = ServerProcess::start(dir.path(), &[]);
    let tasks: Vec<_> = WORKERS
        .into_iter()
        .map(|(worker, dp_size)| {
            tokio::spawn(load(server.url(), worker, dp_size, false, issued.clone()))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let status = tokio::task::spawn_blocking(move || {
        let status = server.terminate();
        (status, server.log())
    })
    .await
    .expect("join");
    assert!(
        status.0.success(),
        "exit status {:?}\n{}",
        status.0,
        status.1
    );
    assert!(status.1.contains("store closed"), "{}", status.1);
    for task in tasks {
        timed(task).await.expect("load task");
    }

    let issued = issued.lock().expect("lock").clone();
    let server = ServerProcess::start(dir.path(), &[]);
    let mut client = server.client().await;
    let listed = timed(client.list_workers(pb::ListWorkersRequest {}))
        .await
        .expect("list")
        .into_inner();
    let counted: u64 = listed.workers.iter().map(|w| w.rooms_issued).sum();
    assert_eq!(
        counted,
        issued.len() as u64,
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
    assert!(issued.iter().all(|(room, _, _)| *room != after));
}
