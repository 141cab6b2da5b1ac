//! A router process for multi-process tests: the test binary runs itself as
//! a child (`ROUTER_SERVER` set), allocates through AllocateRoom and
//! LeaseRooms for workers with dp sizes 1, 2, 3, 4, 8 and 16, and prints
//! `ROOM worker rank room dp_size` lines that the parent checks as a decode
//! side would.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};

use room_allocator::pb;

use super::timed;

pub const WORKERS: [(&str, u32); 6] = [
    ("prefill-dp1", 1),
    ("prefill-dp2", 2),
    ("prefill-dp3", 3),
    ("prefill-dp4", 4),
    ("prefill-dp8", 8),
    ("prefill-dp16", 16),
];
pub const ALLOCATIONS_PER_WORKER: u32 = 150;
pub const LEASES_PER_WORKER: u32 = 3;
pub const LEASE_COUNT: u32 = 40;
/// Rooms each router reports.
pub const ROOMS_PER_ROUTER: usize =
    WORKERS.len() * (ALLOCATIONS_PER_WORKER + LEASES_PER_WORKER * LEASE_COUNT) as usize;

/// A small deterministic generator: each router picks ranks differently.
pub struct Lcg(pub u64);

impl Lcg {
    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u32) -> u32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        u32::try_from((self.0 >> 33) % u64::from(n.max(1))).expect("below a u32")
    }
}

/// The child's body.
pub async fn run_child() {
    let (Ok(url), Ok(id)) = (std::env::var("ROUTER_SERVER"), std::env::var("ROUTER_ID")) else {
        panic!("run as a child by a multi-router test");
    };
    let id: u64 = id.parse().expect("router id");
    let mut client = pb::room_allocator_service_client::RoomAllocatorServiceClient::connect(url)
        .await
        .expect("connect");
    let mut rng = Lcg(id + 1);
    let mut out = String::new();
    for round in 0..ALLOCATIONS_PER_WORKER {
        for (worker, dp_size) in WORKERS {
            let rank = rng.below(dp_size);
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
                    dp_size,
                }))
                .await
                .expect("lease")
                .into_inner();
                for i in 0..u64::from(lease.count) {
                    let rank = rng.below(lease.dp_size);
                    let room = lease.first_base + i * u64::from(lease.dp_size) + u64::from(rank);
                    out.push_str(&format!("ROOM {worker} {rank} {room} {}\n", lease.dp_size));
                }
            }
        }
    }
    print!("{out}");
}

/// Starts router `id` against `url`, running `child_test` of this binary.
pub fn spawn(child_test: &str, url: &str, id: usize) -> Child {
    let exe = std::env::current_exe().expect("test binary");
    Command::new(exe)
        .args([child_test, "--exact", "--ignored", "--nocapture"])
        .env("ROUTER_SERVER", url)
        .env("ROUTER_ID", id.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn router process")
}

/// Waits for the routers and checks every room as the decode side would:
/// `room % dp_size` is the rank the router chose, the dp_size is the
/// worker's, and no room appears twice. Returns each room's owner.
pub async fn collect(routers: Vec<Child>) -> HashMap<u64, (String, u32)> {
    let mut owner_of_room = HashMap::new();
    let count = routers.len();
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
    assert_eq!(owner_of_room.len(), count * ROOMS_PER_ROUTER);
    owner_of_room
}
