//! Four router processes share one allocator: each allocates for workers with
//! dp sizes 1, 2, 3, 4, 8 and 16, through AllocateRoom and LeaseRooms, and a
//! "decode side" checks every room: `room % dp_size` gives back the rank the
//! router chose, and no room appears twice across all processes.

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};

use common::{timed, ServerProcess};
use room_allocator::pb;

const WORKERS: [(&str, u32); 6] = [
    ("prefill-dp1", 1),
    ("prefill-dp2", 2),
    ("prefill-dp3", 3),
    ("prefill-dp4", 4),
    ("prefill-dp8", 8),
    ("prefill-dp16", 16),
];
const ROUTERS: u32 = 4;
const ALLOCATIONS_PER_WORKER: u32 = 150;
const LEASES_PER_WORKER: u32 = 3;
const LEASE_COUNT: u32 = 40;

/// A small deterministic generator: each router picks ranks differently.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u32) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        u32::try_from((self.0 >> 33) % u64::from(below)).expect("below a u32")
    }
}

/// The router: a child process, run by the test below with ROUTER_SERVER set.
#[tokio::test]
#[ignore = "a child process of four_router_processes_get_unique_rank_aligned_rooms"]
async fn router_process() {
    let (Ok(url), Ok(id)) = (std::env::var("ROUTER_SERVER"), std::env::var("ROUTER_ID")) else {
        panic!("run by four_router_processes_get_unique_rank_aligned_rooms");
    };
    let id: u64 = id.parse().expect("router id");
    let mut client = pb::room_allocator_service_client::RoomAllocatorServiceClient::connect(url)
        .await
        .expect("connect");
    let mut rng = Lcg(id + 1);
    let mut out = String::new();
    for round in 0..ALLOCATIONS_PER_WORKER {
        for (worker, dp_size) in WORKERS {
            let rank = rng.next(dp_size);
            let response = timed(client.allocate_room(pb::AllocateRoomRequest {
                prefill_worker: worker.into(),
                dp_rank: rank,
                dp_size,
            }))
            .await
            .expect("allocate")
            .into_inner();
            out.push_str(&format!(
                "ROOM {worker} {rank} {} {}\n",
                response.room, response.dp_size
            ));
            if round < LEASES_PER_WORKER {
                let lease = timed(client.lease_rooms(pb::LeaseRoomsRequest {
                    prefill_worker: worker.into(),
                    count: LEASE_COUNT,
                }))
                .await
                .expect("lease")
                .into_inner();
                for i in 0..u64::from(lease.count) {
                    let rank = rng.next(lease.dp_size);
                    let room = lease.first_base + i * u64::from(lease.dp_size) + u64::from(rank);
                    out.push_str(&format!("ROOM {worker} {rank} {room} {}\n", lease.dp_size));
                }
            }
        }
    }
    print!("{out}");
}

#[tokio::test]
async fn four_router_processes_get_unique_rank_aligned_rooms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &[]);
    let exe = std::env::current_exe().expect("test binary");
    let routers: Vec<_> = (0..ROUTERS)
        .map(|id| {
            Command::new(&exe)
                .args(["router_process", "--exact", "--ignored", "--nocapture"])
                .env("ROUTER_SERVER", server.url())
                .env("ROUTER_ID", id.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn router process")
        })
        .collect();

    let mut owner_of_room: HashMap<u64, (String, u32)> = HashMap::new();
    for router in routers {
        let output = tokio::task::spawn_blocking(move || router.wait_with_output())
            .await
            .expect("join")
            .expect("router output");
        assert!(
            output.status.success(),
            "router failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        for line in String::from_utf8_lossy(&output.stdout).lines() {
            let Some(fields) = line.strip_prefix("ROOM ") else {
                continue;
            };
            let fields: Vec<&str> = fields.split(' ').collect();
            let [worker, rank, room, dp_size] = fields[..] else {
                panic!("bad line {line:?}");
            };
            let (rank, room, dp_size): (u64, u64, u64) = (
                rank.parse().expect("rank"),
                room.parse().expect("room"),
                dp_size.parse().expect("dp_size"),
            );
            // The decode side: SGLang picks the prefill rank as room % dp_size.
            assert_eq!(room % dp_size, rank, "{line}");
            assert!((1..=(1u64 << 63) - 1).contains(&room), "{line}");
            let registered = WORKERS
                .iter()
                .find(|(w, _)| *w == worker)
                .expect("worker")
                .1;
            assert_eq!(dp_size, u64::from(registered), "{line}");
            let previous = owner_of_room.insert(room, (worker.to_owned(), registered));
            assert!(previous.is_none(), "room {room} handed out twice: {line}");
        }
    }
    let per_router =
        WORKERS.len() as u32 * (ALLOCATIONS_PER_WORKER + LEASES_PER_WORKER * LEASE_COUNT);
    assert_eq!(owner_of_room.len(), (ROUTERS * per_router) as usize);

    let mut client = server.client().await;
    for (room, (worker, dp_size)) in owner_of_room.iter().step_by(53) {
        let resolved = timed(client.resolve_rank(pb::ResolveRankRequest { room: *room }))
            .await
            .expect("resolve")
            .into_inner();
        assert_eq!(&resolved.prefill_worker, worker);
        assert_eq!(resolved.dp_size, *dp_size);
        assert_eq!(u64::from(resolved.dp_rank), room % u64::from(*dp_size));
    }
}
