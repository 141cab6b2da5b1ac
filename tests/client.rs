//! `RoomClient` against the real server: rooms with almost no RPCs, unique
//! and rank-aligned across clones and tasks; typed dp_size mismatches;
//! realignment; unknown workers; connecting with retries; the example.

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::time::Duration;

use common::{timed, ServerProcess};
use room_allocator::client::{Error, RoomClient};

fn metric(server: &ServerProcess, line_start: &str) -> u64 {
    let mut stream = std::net::TcpStream::connect(server.metrics_addr).expect("metrics");
    write!(stream, "GET /metrics HTTP/1.0\r\n\r\n").expect("send");
    let mut text = String::new();
    stream.read_to_string(&mut text).expect("read");
    text.lines()
        .find(|line| line.starts_with(line_start))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_share_leases_and_make_unique_aligned_rooms_with_few_rpcs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &[]);
    let client = timed(RoomClient::connect(&server.url()))
        .await
        .expect("connect");
    timed(client.register("p", 4)).await.expect("register");
    let tasks: Vec<_> = (0..4u32)
        .map(|task| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut rooms = Vec::with_capacity(50_000);
                for i in 0..50_000u32 {
                    let rank = (task + i) % 4;
                    let room = client.allocate("p", rank, 4).await.expect("room");
                    assert_eq!(room % 4, u64::from(rank));
                    rooms.push(room);
                }
                rooms
            })
        })
        .collect();
    let mut all = HashSet::new();
    for task in tasks {
        for room in timed(task).await.expect("task") {
            assert!(all.insert(room), "room {room} twice");
        }
    }
    assert_eq!(all.len(), 200_000);
    let leases = metric(
        &server,
        "room_allocator_requests_total{method=\"LeaseRooms\",code=\"OK\"}",
    );
    let allocations = metric(
        &server,
        "room_allocator_requests_total{method=\"AllocateRoom\",",
    );
    assert!(
        leases > 0 && leases < 200,
        "{leases} LeaseRooms calls for 200000 rooms"
    );
    assert_eq!(allocations, 0, "no AllocateRoom on the hot path");
    let resolved = timed(client.resolve(*all.iter().next().expect("room")))
        .await
        .expect("resolve");
    assert_eq!(
        (resolved.prefill_worker.as_str(), resolved.dp_size),
        ("p", 4)
    );
}

#[tokio::test]
async fn a_stale_dp_size_is_a_typed_error_and_realignment_drops_the_old_lease() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &[]);
    let client = timed(RoomClient::connect(&server.url()))
        .await
        .expect("connect");
    timed(client.register("w", 4)).await.expect("register");
    let before = timed(client.allocate("w", 1, 4)).await.expect("room");
    match timed(client.allocate("w", 1, 8)).await {
        Err(Error::DpSizeMismatch {
            registered: 4,
            requested: 8,
            ..
        }) => {}
        other => panic!("expected a dp_size mismatch, got {other:?}"),
    }
    timed(client.register("w", 8)).await.expect("realign");
    let after = timed(client.allocate("w", 7, 8)).await.expect("room");
    assert_eq!(after % 8, 7);
    assert_ne!(before, after);
    assert_eq!(
        timed(client.resolve(after)).await.expect("resolve").dp_size,
        8
    );
    assert!(matches!(
        client.allocate("w", 8, 8).await,
        Err(Error::RankOutOfRange {
            dp_rank: 8,
            dp_size: 8
        })
    ));
    // An unknown worker is registered with the caller's dp_size.
    let room = timed(client.allocate("fresh", 2, 3)).await.expect("room");
    assert_eq!(room % 3, 2);
}

#[tokio::test]
async fn connect_retries_until_the_server_is_up() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let connecting = tokio::spawn(async move {
        RoomClient::builder([url])
            .connect_patience(Duration::from_secs(20))
            .connect()
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let listen = format!("127.0.0.1:{port}");
    let server = ServerProcess::start(dir.path(), &["--listen", &listen]);
    let client = timed(connecting)
        .await
        .expect("join")
        .expect("connected after retries");
    assert_eq!(
        timed(client.allocate("late", 1, 2)).await.expect("room") % 2,
        1
    );
    drop(server);

    let refused = RoomClient::builder(["http://127.0.0.1:1"])
        .connect_patience(Duration::from_millis(200))
        .connect()
        .await;
    assert!(matches!(refused, Err(Error::Connect { .. })));
}

#[test]
fn the_pd_router_example_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &[]);
    // cargo test builds the examples beside the test binaries' deps dir.
    let example = std::env::current_exe()
        .expect("test binary")
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target dir")
        .join("examples/pd_router");
    let output = std::process::Command::new(&example)
        .arg(server.url())
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", example.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("decode pulls from rank 3"), "{stdout}");
    assert!(
        stdout.contains("ResolveRank: worker prefill-0.example:8998"),
        "{stdout}"
    );
}
