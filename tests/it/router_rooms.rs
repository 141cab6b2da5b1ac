//! What every router needs from `RoomClient`, against the real binary
//! (issue 19): GetRoomSpace, batches, contiguous blocks for SGLang's `room +
//! i` expansion, the outage fallback (server frozen, then killed) and the
//! warm-up.

use crate::common;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{timed, ServerProcess};
use room_allocator::client::limits::MAX_ROOM;
use room_allocator::client::{Error, RoomClient};
use tonic::Code;

/// Where the allocator stops in the fallback tests: the upper half of the
/// room space is left to the outage fallback, as the client docs suggest.
const ALLOCATOR_MAX_ROOM: u64 = (1 << 62) - 1;
const FALLBACK_START: u64 = 1 << 62;

fn metric(server: &ServerProcess, line_start: &str) -> u64 {
    common::http_get(server.metrics_addr, "/metrics")
        .lines()
        .find(|line| line.starts_with(line_start))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0)
}

fn calls(server: &ServerProcess, method: &str) -> u64 {
    metric(
        server,
        &format!("room_allocator_requests_total{{method=\"{method}\",code=\"OK\"}}"),
    )
}

#[tokio::test]
async fn get_room_space_answers_the_servers_min_and_max_room() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(
        dir.path(),
        &["--min-room", "1000", "--max-room", "4611686018427387903"],
    );
    let client = timed(RoomClient::connect(server.url()))
        .await
        .expect("connect");
    let space = timed(client.room_space()).await.expect("GetRoomSpace");
    assert_eq!((space.min_room, space.max_room), (1000, ALLOCATOR_MAX_ROOM));
    assert_eq!(calls(&server, "GetRoomSpace"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocate_many_keeps_the_order_aligns_each_item_and_leases_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &[]);
    let client = timed(RoomClient::connect(server.url()))
        .await
        .expect("connect");
    let other = timed(RoomClient::connect(server.url()))
        .await
        .expect("connect");
    timed(client.register("batch", 4)).await.expect("register");

    // More than a first lease (256 bases): one lease sized for the batch.
    let ranks: Vec<u32> = (0..1000u32).map(|i| (i * 7 + 3) % 4).collect();
    let rooms = timed(client.allocate_many("batch", &ranks, 4))
        .await
        .expect("batch");
    assert_eq!(rooms.len(), ranks.len());
    for (room, rank) in rooms.iter().zip(&ranks) {
        assert_eq!(room % 4, u64::from(*rank), "room {room} for rank {rank}");
    }
    assert_eq!(calls(&server, "AllocateRoom"), 0);
    // The batch's lease, and at most one refill it left running.
    assert!(
        calls(&server, "LeaseRooms") <= 2,
        "{}",
        calls(&server, "LeaseRooms")
    );

    let mut seen: HashSet<u64> = rooms.iter().copied().collect();
    assert_eq!(seen.len(), rooms.len(), "a batch repeats no room");
    let more = timed(other.allocate_many("batch", &ranks[..300], 4))
        .await
        .expect("another client's batch");
    let again = timed(client.allocate_many("batch", &ranks[..300], 4))
        .await
        .expect("a second batch");
    for room in more.into_iter().chain(again) {
        assert!(seen.insert(room), "room {room} handed out twice");
    }
    for (room, rank) in rooms.iter().zip(&ranks).step_by(97) {
        let owner = timed(client.resolve(*room)).await.expect("resolve");
        assert_eq!(
            (owner.prefill_worker.as_str(), owner.dp_rank, owner.dp_size),
            ("batch", *rank, 4)
        );
    }

    assert_eq!(
        timed(client.allocate_many("batch", &[], 4))
            .await
            .expect("empty"),
        Vec::<u64>::new()
    );
    let (code, text) = match timed(client.allocate_many("batch", &[0, 4], 4)).await {
        Err(error @ Error::RankOutOfRange { .. }) => (error.code(), error.to_string()),
        other => panic!("expected RankOutOfRange, got {other:?}"),
    };
    assert_eq!(code, Code::InvalidArgument, "{text}");
}

/// What SGLang does with one room for a request of `num` items.
fn expand(room: u64, num: u32) -> impl Iterator<Item = u64> {
    (0..u64::from(num)).map(move |i| room + i)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_covers_its_numbers_and_blocks_expanded_by_sglang_meet_no_other_room() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &[]);
    let client = timed(RoomClient::connect(server.url()))
        .await
        .expect("connect");
    let other = timed(RoomClient::connect(server.url()))
        .await
        .expect("connect");
    timed(client.register("blocks", 4)).await.expect("register");

    // The invariant blocks rest on: a lease's bases first_base + j * dp_size
    // cover [first_base, first_base + count * dp_size) with no gap, every
    // number of it issued for the worker, with its rank.
    let lease = timed(client.lease_rooms("blocks", 8, 4))
        .await
        .expect("lease");
    for number in lease.first_base..lease.first_base + 8 * 4 {
        let owner = timed(client.resolve(number)).await.expect("resolve");
        assert_eq!(
            (owner.prefill_worker.as_str(), u64::from(owner.dp_rank)),
            ("blocks", number % 4),
            "number {number} of lease {lease:?}"
        );
    }

    // Blocks from two clients, interleaved with single rooms and batches:
    // every number a request's items get after SGLang's expansion is unique.
    let mut numbers = HashSet::new();
    let mut taken = |room: u64, num: u32| {
        for number in expand(room, num) {
            assert!(numbers.insert(number), "number {number} used twice");
        }
    };
    let cases: &[(u32, u32)] = &[(0, 1), (3, 3), (1, 4), (2, 9), (3, 1), (0, 2), (1, 300)];
    for round in 0..20 {
        for &(first_rank, num) in cases {
            let block_client = if round % 2 == 0 { &client } else { &other };
            let room = timed(block_client.allocate_block("blocks", first_rank, num, 4))
                .await
                .expect("block");
            assert_eq!(room % 4, u64::from(first_rank));
            if round == 0 {
                for (i, number) in expand(room, num).enumerate().step_by(5) {
                    let owner = timed(client.resolve(number)).await.expect("resolve");
                    let i = u32::try_from(i).expect("small");
                    assert_eq!(
                        (owner.prefill_worker.as_str(), owner.dp_rank),
                        ("blocks", (first_rank + i) % 4),
                        "item {i} of block {room}+{num}"
                    );
                }
            }
            taken(room, num);
            let single = timed(other.allocate("blocks", first_rank, 4))
                .await
                .expect("room");
            taken(single, 1);
        }
        for room in timed(client.allocate_many("blocks", &[0, 1, 2, 3], 4))
            .await
            .expect("batch")
        {
            taken(room, 1);
        }
    }

    for (num, first_rank) in [(0, 0), (1 << 24, 1)] {
        match timed(client.allocate_block("blocks", first_rank, num, 4)).await {
            Err(error @ Error::BlockSize { .. }) => {
                assert_eq!(error.code(), Code::InvalidArgument, "{error}")
            }
            other => panic!("block of {num}: expected BlockSize, got {other:?}"),
        }
    }
    // The largest block one lease holds at dp_size 4 (a million bases) is
    // served.
    let max = 4_000_000 - 1;
    let room = timed(client.allocate_block("blocks", 1, max, 4))
        .await
        .expect("the largest block");
    assert_eq!(room % 4, 1);
}

#[tokio::test]
async fn an_outage_fallback_region_that_overlaps_the_allocators_rooms_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &["--max-room", "4611686018427387904"]);
    let refused = timed(
        RoomClient::builder([server.url()])
            .outage_fallback(FALLBACK_START..=MAX_ROOM)
            .connect(),
    )
    .await
    .expect_err("2^62 is an allocator room");
    assert!(matches!(refused, Error::Config(_)), "{refused:?}");
    let text = refused.to_string();
    assert!(
        text.contains("overlaps the rooms the allocator hands out"),
        "{text}"
    );
    assert!(text.contains("--max-room 4611686018427387903"), "{text}");

    let refused = timed(
        RoomClient::builder([server.url()])
            .outage_fallback(0..=10)
            .connect(),
    )
    .await
    .expect_err("0 is no room");
    assert!(matches!(refused, Error::Config(_)), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_allocator_frozen_then_killed_rooms_come_from_the_fallback_region() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = ServerProcess::start(dir.path(), &["--max-room", "4611686018427387903"]);
    let reported = Arc::new(Mutex::new(Vec::new()));
    let deadline = Duration::from_millis(50);
    let client = {
        let reported = reported.clone();
        timed(
            RoomClient::builder([server.url()])
                // The call timeout far above the allocation deadline, and
                // leases that outlive a slow run: only the deadline decides.
                .timeout(Duration::from_secs(10))
                .max_lease_age(Duration::from_secs(600))
                .outage_fallback(FALLBACK_START..=MAX_ROOM)
                .allocation_deadline(deadline)
                .on_fallback(move |fallback| {
                    reported.lock().expect("lock").push((
                        fallback.prefill_worker.to_owned(),
                        fallback.dp_rank,
                        fallback.room,
                        fallback.num,
                        fallback.cause.code(),
                    ));
                })
                .connect(),
        )
        .await
        .expect("connect: the region misses the allocator's rooms")
    };
    for worker in ["leased", "frozen", "killed"] {
        timed(client.register(worker, 4)).await.expect("register");
    }
    let leased = timed(client.allocate("leased", 1, 4)).await.expect("room");
    assert!(leased <= ALLOCATOR_MAX_ROOM);
    assert_eq!(client.fallback_rooms(), 0, "the allocator answered");
    // A refusal is returned, not papered over with a fallback room.
    let refused = timed(client.allocate("leased", 1, 8)).await;
    assert!(
        matches!(refused, Err(Error::DpSizeMismatch { .. })),
        "{refused:?}"
    );
    let leased = timed(client.allocate("leased", 1, 4)).await.expect("room");

    let in_region = |room: u64, rank: u32, num: u64| {
        room >= FALLBACK_START && room + (num - 1) <= MAX_ROOM && room % 4 == u64::from(rank)
    };
    let mut rooms = HashSet::from([leased]);

    server.freeze();
    // Rooms still leased come first, with no RPC.
    assert_eq!(
        client.try_allocate("leased", 3, 4).map(|room| room % 4),
        Some(3)
    );
    let room = timed(client.allocate("leased", 2, 4))
        .await
        .expect("leased");
    assert!(room <= ALLOCATOR_MAX_ROOM && rooms.insert(room));
    assert_eq!(client.fallback_rooms(), 0);
    // A worker with no lease: the allocator does not answer in time.
    let started = Instant::now();
    let room = timed(client.allocate("frozen", 3, 4))
        .await
        .expect("fallback");
    let waited = started.elapsed();
    assert!(in_region(room, 3, 1), "{room}");
    assert!(rooms.insert(room));
    assert!(
        waited >= deadline && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    let block = timed(client.allocate_block("frozen", 2, 5, 4))
        .await
        .expect("fallback block");
    assert!(in_region(block, 2, 5), "{block}");
    let batch = timed(client.allocate_many("frozen", &[0, 1, 2], 4))
        .await
        .expect("fallback batch");
    for (room, rank) in batch.iter().zip([0, 1, 2]) {
        assert!(in_region(*room, rank, 1), "{room}");
        assert!(rooms.insert(*room));
    }
    assert_eq!(client.fallback_rooms(), 5);

    server.kill9();
    // Connections refused: the fallback comes without waiting the deadline
    // out (the call fails at once); leased rooms still come first.
    let room = timed(client.allocate("leased", 0, 4))
        .await
        .expect("leased");
    assert!(room <= ALLOCATOR_MAX_ROOM && rooms.insert(room));
    for rank in 0..4 {
        let room = timed(client.allocate("killed", rank, 4))
            .await
            .expect("fallback");
        assert!(in_region(room, rank, 1), "{room}");
        assert!(rooms.insert(room));
    }
    assert_eq!(client.fallback_rooms(), 9);

    let reported = reported.lock().expect("lock").clone();
    assert_eq!(reported.len(), 9, "{reported:?}");
    assert_eq!(
        reported[0],
        (
            "frozen".to_owned(),
            3,
            reported[0].2,
            1,
            Code::DeadlineExceeded
        )
    );
    assert_eq!(reported[1].3, 5, "the block's num");
    assert_eq!(reported[1].2, block);
    for report in &reported[5..] {
        assert_eq!(report.0, "killed");
        assert!(
            matches!(report.4, Code::Unavailable | Code::DeadlineExceeded),
            "{report:?}"
        );
    }

    // Without a fallback the same outage is an error, as before.
    let plain = RoomClient::from_channel(
        tonic::transport::Channel::from_shared(server.url())
            .expect("url")
            .connect_lazy(),
    );
    let failed = timed(plain.allocate("killed", 0, 4)).await;
    assert!(
        matches!(&failed, Err(error) if error.code() == Code::Unavailable),
        "{failed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_up_leases_ahead_so_the_first_room_needs_no_rpc() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &[]);
    let client = timed(RoomClient::connect(server.url()))
        .await
        .expect("connect");
    timed(client.register("warm", 8)).await.expect("register");
    timed(client.register("cold", 8)).await.expect("register");
    assert_eq!(
        client.try_allocate("warm", 5, 8),
        None,
        "nothing leased yet"
    );
    timed(client.warm_up(&[("warm", 8)]))
        .await
        .expect("warm up");
    let leases = calls(&server, "LeaseRooms");
    let room = client.try_allocate("warm", 5, 8).expect("a leased room");
    assert_eq!(room % 8, 5);
    timed(client.allocate("warm", 6, 8)).await.expect("room");
    assert_eq!(calls(&server, "LeaseRooms"), leases, "no RPC after warm-up");
    assert_eq!(
        client.try_allocate("cold", 0, 8),
        None,
        "only the named workers"
    );

    // A stale dp_size is the warm-up's error too.
    let stale = timed(client.warm_up(&[("warm", 4)])).await;
    assert!(
        matches!(stale, Err(Error::DpSizeMismatch { registered: 8, .. })),
        "{stale:?}"
    );
    assert_eq!(client.fallback_rooms(), 0, "no fallback configured");
}

/// The example's lines: (room, rank or None, source).
fn rooms_of(output: &std::process::Output) -> Vec<(u64, Option<u64>, String)> {
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .map(|line| {
            let words: Vec<&str> = line.split(' ').collect();
            assert_eq!(words.len(), 6, "{line}");
            (
                words[1].parse().expect("room"),
                words[3].parse().ok(),
                words[5].to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn the_dynamo_example_takes_allocator_rooms_and_keeps_dynamos_own_where_it_must() {
    let example = common::example("room-allocator-client", "dynamo_bootstrap_room");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = ServerProcess::start(dir.path(), &[]);
    let output = std::process::Command::new(&example)
        .arg(server.url())
        .output()
        .expect("run the example");
    assert!(output.status.success(), "{output:?}");
    let rooms = rooms_of(&output);
    assert_eq!(rooms.len(), 8, "{output:?}");
    let client = timed(RoomClient::connect(server.url()))
        .await
        .expect("connect");
    for (i, (room, rank, source)) in rooms.iter().enumerate() {
        let i = u64::try_from(i).expect("small");
        if i % 4 == 3 {
            // dp_size unknown: Dynamo's own room, as Dynamo makes it today.
            assert_eq!((rank, source.as_str()), (&None, "Dynamo"));
            continue;
        }
        assert_eq!((rank, source.as_str()), (&Some(i % 4), "Allocator"));
        let owner = timed(client.resolve(*room))
            .await
            .expect("an allocator room");
        assert_eq!(
            (
                owner.prefill_worker.as_str(),
                u64::from(owner.dp_rank),
                owner.dp_size
            ),
            ("prefill-0.example:8998", i % 4, 4)
        );
    }

    // The allocator down: every room is Dynamo's, still aligned.
    let url = server.url();
    server.kill9();
    let output = std::process::Command::new(&example)
        .arg(url)
        .output()
        .expect("run the example");
    assert!(output.status.success(), "{output:?}");
    let rooms = rooms_of(&output);
    assert_eq!(rooms.len(), 8, "{output:?}");
    for (i, (_, rank, source)) in rooms.iter().enumerate() {
        let i = u64::try_from(i).expect("small");
        assert_eq!(source, "Dynamo");
        assert_eq!(*rank, (i % 4 != 3).then_some(i % 4));
    }
}
