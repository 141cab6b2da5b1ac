//! The gRPC contract through the real binary: every status code, the
//! register/realign/deregister rules, health, reflection, metrics, the CLI,
//! and refusing to start on a locked or damaged data dir.

use crate::common;

use std::collections::HashSet;

use common::{run_cli, timed, ServerProcess};
use room_allocator::pb;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const MAX_ROOM: u64 = (1 << 63) - 1;

fn register(worker: &str, dp_size: u32) -> pb::RegisterWorkerRequest {
    pb::RegisterWorkerRequest {
        prefill_worker: worker.into(),
        dp_size,
    }
}

fn allocate(worker: &str, dp_rank: u32, dp_size: u32) -> pb::AllocateRoomRequest {
    pb::AllocateRoomRequest {
        prefill_worker: worker.into(),
        dp_rank,
        dp_size,
    }
}

fn lease(worker: &str, count: u32) -> pb::LeaseRoomsRequest {
    pb::LeaseRoomsRequest {
        prefill_worker: worker.into(),
        count,
        dp_size: 0,
    }
}

#[tokio::test]
async fn every_bad_request_gets_its_status_code_and_a_message_that_says_what_to_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &["--max-workers", "3"]);
    let mut client = server.client().await;
    timed(client.register_worker(register("known", 4)))
        .await
        .expect("register");
    let long = "w".repeat(254);

    // (what, code, words the message must contain)
    let mut cases: Vec<(&str, Result<(), tonic::Status>, Code, &str)> = Vec::new();
    let mut c = client.clone();
    let mut check = |name, result: Result<(), tonic::Status>, code, words| {
        cases.push((name, result, code, words));
    };
    check(
        "empty worker",
        c.register_worker(register("", 1)).await.map(drop),
        Code::InvalidArgument,
        "prefill_worker is empty",
    );
    check(
        "worker over 253 bytes",
        c.allocate_room(allocate(&long, 0, 1)).await.map(drop),
        Code::InvalidArgument,
        "254 bytes",
    );
    check(
        "dp_size 0 in RegisterWorker",
        c.register_worker(register("w", 0)).await.map(drop),
        Code::InvalidArgument,
        "dp_size must be at least 1",
    );
    check(
        "dp_size over 65536",
        c.register_worker(register("w", 65537)).await.map(drop),
        Code::InvalidArgument,
        "65537 is over the maximum of 65536",
    );
    check(
        "dp_rank >= dp_size",
        c.allocate_room(allocate("known", 4, 0)).await.map(drop),
        Code::InvalidArgument,
        "dp_rank 4 is out of range for dp_size 4",
    );
    check(
        "dp_rank >= requested dp_size of an unknown worker",
        c.allocate_room(allocate("fresh", 2, 2)).await.map(drop),
        Code::InvalidArgument,
        "dp_rank 2 is out of range for dp_size 2",
    );
    check(
        "lease count 0",
        c.lease_rooms(lease("known", 0)).await.map(drop),
        Code::InvalidArgument,
        "lease 1 to 1000000",
    );
    check(
        "lease count over 1,000,000",
        c.lease_rooms(lease("known", 1_000_001)).await.map(drop),
        Code::InvalidArgument,
        "count 1000001",
    );
    check(
        "resolve room 0",
        c.resolve_rank(pb::ResolveRankRequest { room: 0 })
            .await
            .map(drop),
        Code::InvalidArgument,
        "room 0 is never issued",
    );
    check(
        "resolve room over 2^63-1",
        c.resolve_rank(pb::ResolveRankRequest { room: MAX_ROOM + 1 })
            .await
            .map(drop),
        Code::InvalidArgument,
        "masks rooms to 63 bits",
    );
    check(
        "allocate for an unregistered worker without dp_size",
        c.allocate_room(allocate("nobody", 0, 0)).await.map(drop),
        Code::NotFound,
        "call RegisterWorker first",
    );
    check(
        "lease for an unregistered worker",
        c.lease_rooms(lease("nobody", 5)).await.map(drop),
        Code::NotFound,
        "\"nobody\" is not registered",
    );
    check(
        "resolve a room never issued",
        c.resolve_rank(pb::ResolveRankRequest { room: MAX_ROOM })
            .await
            .map(drop),
        Code::NotFound,
        "never issued",
    );
    check(
        "deregister an unknown worker",
        c.deregister_worker(pb::DeregisterWorkerRequest {
            prefill_worker: "nobody".into(),
        })
        .await
        .map(drop),
        Code::NotFound,
        "not registered",
    );
    check(
        "dp_size mismatch",
        c.allocate_room(allocate("known", 0, 8)).await.map(drop),
        Code::FailedPrecondition,
        "registered with dp_size 4, not 8",
    );
    check(
        "the worker limit",
        async {
            c.register_worker(register("second", 1)).await?;
            c.register_worker(register("third", 1)).await?;
            c.register_worker(register("fourth", 1)).await.map(drop)
        }
        .await,
        Code::ResourceExhausted,
        "--max-workers",
    );

    let mut failures = Vec::new();
    for (name, result, code, words) in cases {
        match result {
            Ok(()) => failures.push(format!("{name}: succeeded, expected {code:?}")),
            Err(status) if status.code() != code || !status.message().contains(words) => failures
                .push(format!(
                    "{name}: got {:?} {:?}, expected {code:?} containing {words:?}",
                    status.code(),
                    status.message()
                )),
            Err(_) => {}
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn the_room_space_limit_gives_resource_exhausted_and_never_a_room_past_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &["--max-room", "5000"]);
    let mut client = server.client().await;
    timed(client.register_worker(register("w", 4)))
        .await
        .expect("register");
    let mut rooms = HashSet::new();
    let status = loop {
        match timed(client.allocate_room(allocate("w", 1, 0))).await {
            Ok(response) => {
                let room = response.into_inner().room;
                assert!(room <= 5000 && room % 4 == 1, "room {room}");
                assert!(rooms.insert(room), "room {room} twice");
                assert!(rooms.len() < 2000, "the limit was not enforced");
            }
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("room space is used up"),
        "{status:?}"
    );
    assert!(
        rooms.len() > 1000,
        "most of the space was handed out: {}",
        rooms.len()
    );
}

#[tokio::test]
async fn registration_is_idempotent_realignment_moves_later_rooms_and_deregistration_stops_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &[]);
    let mut client = server.client().await;

    let first = timed(client.register_worker(register("p0", 2)))
        .await
        .expect("register")
        .into_inner();
    let again = timed(client.register_worker(register("p0", 2)))
        .await
        .expect("same size again")
        .into_inner();
    assert_eq!(first, again);

    let old = timed(client.allocate_room(allocate("p0", 1, 2)))
        .await
        .expect("allocate")
        .into_inner();
    assert_eq!((old.room % 2, old.dp_size), (1, 2));

    let realigned = timed(client.register_worker(register("p0", 8)))
        .await
        .expect("realign")
        .into_inner();
    assert_eq!(realigned.worker.expect("worker").dp_size, 8);
    let stale = timed(client.allocate_room(allocate("p0", 1, 2)))
        .await
        .expect_err("a stale dp_size");
    assert_eq!(stale.code(), Code::FailedPrecondition);
    let registered = stale
        .metadata()
        .get("registered-dp-size")
        .map(|v| v.to_str().expect("ascii").to_owned());
    assert_eq!(
        registered.as_deref(),
        Some("8"),
        "the registered size, machine-readable"
    );
    let new = timed(client.allocate_room(allocate("p0", 5, 0)))
        .await
        .expect("allocate")
        .into_inner();
    assert_eq!((new.room % 8, new.dp_size), (5, 8));

    let leased = timed(client.lease_rooms(lease("p0", 10)))
        .await
        .expect("lease")
        .into_inner();
    assert_eq!((leased.count, leased.dp_size), (10, 8));
    assert_eq!(leased.first_base % 8, 0);
    let lease_rooms: Vec<u64> = (0..10).map(|i| leased.first_base + i * 8).collect();
    assert!(!lease_rooms.iter().any(|b| (*b..b + 8).contains(&new.room)));

    for (room, size) in [(old.room, 2), (new.room, 8), (lease_rooms[9] + 3, 8)] {
        let resolved = timed(client.resolve_rank(pb::ResolveRankRequest { room }))
            .await
            .expect("resolve")
            .into_inner();
        assert_eq!(resolved.prefill_worker, "p0");
        assert_eq!(resolved.dp_size, size);
        assert_eq!(u64::from(resolved.dp_rank), room % u64::from(size));
    }

    let listed = timed(client.list_workers(pb::ListWorkersRequest::default()))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(
        listed.workers,
        vec![pb::WorkerInfo {
            prefill_worker: "p0".into(),
            dp_size: 8,
            rooms_issued: 2 + 10,
        }]
    );

    timed(client.deregister_worker(pb::DeregisterWorkerRequest {
        prefill_worker: "p0".into(),
    }))
    .await
    .expect("deregister");
    for dp_size in [0, 8, 2] {
        let refused = timed(client.allocate_room(allocate("p0", 0, dp_size)))
            .await
            .expect_err("no rooms after deregistration, whatever dp_size");
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
        assert_eq!(
            refused
                .metadata()
                .get("error-reason")
                .map(|v| v.to_str().ok()),
            Some(Some("WORKER_DEREGISTERED"))
        );
        assert!(refused.message().contains("RegisterWorker"), "{refused:?}");
    }
    let still = timed(client.resolve_rank(pb::ResolveRankRequest { room: old.room }))
        .await
        .expect("old rooms still resolve")
        .into_inner();
    assert_eq!(still.prefill_worker, "p0");
    let listed = timed(client.list_workers(pb::ListWorkersRequest::default()))
        .await
        .expect("list")
        .into_inner();
    assert!(listed.workers.is_empty());
}

#[tokio::test]
async fn registrations_realignments_and_counts_survive_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = ServerProcess::start(dir.path(), &[]);
    let mut client = server.client().await;
    timed(client.register_worker(register("a", 2)))
        .await
        .expect("a");
    timed(client.register_worker(register("b", 4)))
        .await
        .expect("b");
    timed(client.register_worker(register("b", 3)))
        .await
        .expect("realign b");
    timed(client.register_worker(register("c", 1)))
        .await
        .expect("c");
    timed(client.deregister_worker(pb::DeregisterWorkerRequest {
        prefill_worker: "c".into(),
    }))
    .await
    .expect("deregister c");
    let mut before = HashSet::new();
    for _ in 0..25 {
        let room = timed(client.allocate_room(allocate("b", 2, 0)))
            .await
            .expect("allocate")
            .into_inner()
            .room;
        before.insert(room);
    }
    assert!(server.terminate().success(), "SIGTERM exits 0");
    assert!(server.log().contains("health is NOT_SERVING"));

    let server = ServerProcess::start(dir.path(), &[]);
    let mut client = server.client().await;
    let listed = timed(client.list_workers(pb::ListWorkersRequest::default()))
        .await
        .expect("list")
        .into_inner();
    let summary: Vec<(String, u32, u64)> = listed
        .workers
        .into_iter()
        .map(|w| (w.prefill_worker, w.dp_size, w.rooms_issued))
        .collect();
    assert_eq!(
        summary,
        vec![("a".into(), 2, 0), ("b".into(), 3, 25)],
        "registrations, the realignment and the counts persisted"
    );
    let after = timed(client.allocate_room(allocate("b", 2, 0)))
        .await
        .expect("allocate")
        .into_inner()
        .room;
    assert!(!before.contains(&after));
    assert!(
        before.iter().all(|r| *r < after),
        "resumes past every range"
    );
}

#[tokio::test]
async fn health_serves_overall_and_per_service_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &[]);
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", "room_allocator.v1.RoomAllocatorService"] {
        let status = timed(health.check(HealthCheckRequest {
            service: service.into(),
        }))
        .await
        .expect("health check")
        .into_inner()
        .status;
        assert_eq!(status, ServingStatus::Serving as i32, "service {service:?}");
    }
    let unknown = timed(health.check(HealthCheckRequest {
        service: "no.such.Service".into(),
    }))
    .await
    .expect_err("unknown service");
    assert_eq!(unknown.code(), Code::NotFound);
}

#[tokio::test]
async fn reflection_v1_and_v1alpha_both_list_the_allocator_and_health_services() {
    use tokio_stream::StreamExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &[]);
    let channel = server.channel().await;

    let mut v1 = tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
        channel.clone(),
    );
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let mut stream = timed(v1.server_reflection_info(tokio_stream::once(request)))
        .await
        .expect("v1 reflection")
        .into_inner();
    let response = timed(stream.next())
        .await
        .expect("one response")
        .expect("ok");
    let Some(
        tonic_reflection::pb::v1::server_reflection_response::MessageResponse::ListServicesResponse(
            list,
        ),
    ) = response.message_response
    else {
        panic!("v1: unexpected response {response:?}");
    };
    let v1_names: HashSet<String> = list.service.into_iter().map(|s| s.name).collect();

    let mut v1alpha =
        tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient::new(
            channel,
        );
    let request = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let mut stream = timed(v1alpha.server_reflection_info(tokio_stream::once(request)))
        .await
        .expect("v1alpha reflection")
        .into_inner();
    let response = timed(stream.next())
        .await
        .expect("one response")
        .expect("ok");
    let Some(tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("v1alpha: unexpected response {response:?}");
    };
    let v1alpha_names: HashSet<String> = list.service.into_iter().map(|s| s.name).collect();

    for names in [&v1_names, &v1alpha_names] {
        assert!(
            names.contains("room_allocator.v1.RoomAllocatorService"),
            "{names:?}"
        );
        assert!(names.contains("grpc.health.v1.Health"), "{names:?}");
    }
}

use common::http_get;

#[tokio::test]
async fn metrics_count_rooms_ranges_and_requests_by_method_and_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &[]);
    let mut client = server.client().await;
    for _ in 0..3 {
        timed(client.allocate_room(allocate("m", 0, 1)))
            .await
            .expect("allocate");
    }
    timed(client.lease_rooms(lease("m", 7)))
        .await
        .expect("lease");
    let _ = timed(client.allocate_room(allocate("nobody", 0, 0))).await;

    let text = http_get(server.metrics_addr, "/metrics");
    assert!(
        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
        "{text}"
    );
    for expected in [
        "room_allocator_rooms_issued_total{method=\"AllocateRoom\"} 3",
        "room_allocator_rooms_issued_total{method=\"LeaseRooms\"} 7",
        "room_allocator_ranges_reserved_total{store=\"embedded\"}",
        "room_allocator_requests_total{method=\"AllocateRoom\",code=\"OK\"} 3",
        "room_allocator_requests_total{method=\"AllocateRoom\",code=\"NOT_FOUND\"} 1",
        "room_allocator_request_duration_seconds_bucket{",
        "# HELP room_allocator_rooms_issued_total Rooms handed out",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in\n{text}");
    }
    let other = http_get(server.metrics_addr, "/");
    assert!(other.contains("404"), "{other}");
}

#[tokio::test]
async fn the_cli_prints_json_lines_and_status_names() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &[]);
    let url = server.url();
    let (code, out, _) = run_cli(&[
        "register",
        "--server",
        &url,
        "--worker",
        "cli",
        "--dp-size",
        "3",
    ]);
    assert_eq!(code, 0);
    let worker: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert_eq!(worker["dp_size"], 3);

    let (code, out, err) = run_cli(&[
        "allocate", "--server", &url, "--worker", "cli", "--rank", "2", "--count", "4",
    ]);
    assert_eq!(code, 0, "{err}");
    let rooms: Vec<serde_json::Value> = out
        .lines()
        .map(|line| serde_json::from_str(line).expect("JSON line"))
        .collect();
    assert_eq!(rooms.len(), 4);
    for room in &rooms {
        assert_eq!(room["room"].as_u64().expect("room") % 3, 2);
        assert_eq!(room["dp_size"], 3);
    }
    let room = rooms[0]["room"].to_string();

    let (code, out, _) = run_cli(&["resolve", "--server", &url, &room]);
    assert_eq!(code, 0);
    let resolved: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON");
    assert_eq!(resolved["prefill_worker"], "cli");
    assert_eq!(resolved["dp_rank"], 2);

    let (code, out, _) = run_cli(&["workers", "--server", &url]);
    assert_eq!(code, 0);
    let listed: serde_json::Value = serde_json::from_str(out.trim()).expect("JSON");
    assert_eq!(listed["rooms_issued"], 4);

    let (code, out, err) = run_cli(&[
        "allocate",
        "--server",
        &url,
        "--worker",
        "cli",
        "--rank",
        "0",
        "--dp-size",
        "5",
    ]);
    assert_ne!(code, 0);
    assert!(out.is_empty(), "nothing on stdout on failure: {out}");
    assert!(err.contains("FAILED_PRECONDITION: "), "{err}");

    let (code, _, err) = run_cli(&["resolve", "--server", "http://127.0.0.1:1", "5"]);
    assert_ne!(code, 0);
    assert!(err.contains("UNAVAILABLE"), "{err}");
}

#[test]
fn a_second_server_on_the_same_data_dir_refuses_to_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _first = ServerProcess::start(dir.path(), &[]);
    let Err(failure) = ServerProcess::try_start(dir.path(), &[]) else {
        panic!("the second server started");
    };
    assert!(!failure.status.expect("exited").success());
    assert!(
        failure.log.contains("locked by another room-allocator"),
        "{}",
        failure.log
    );
}

#[test]
fn a_damaged_log_refuses_to_start_names_the_file_and_is_left_as_found() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    {
        let mut server = ServerProcess::start(dir.path(), &[]);
        rt.block_on(async {
            let mut client = server.client().await;
            timed(client.allocate_room(allocate("w", 0, 2)))
                .await
                .expect("allocate");
        });
        assert!(server.terminate().success());
    }
    let log_path = dir.path().join("rooms.log");
    let mut bytes = std::fs::read(&log_path).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&log_path, &bytes).expect("write");

    let Err(failure) = ServerProcess::try_start(dir.path(), &[]) else {
        panic!("started on a damaged log");
    };
    assert!(!failure.status.expect("exited").success());
    assert!(
        failure.log.contains("rooms.log is corrupt"),
        "{}",
        failure.log
    );
    assert_eq!(std::fs::read(&log_path).expect("read"), bytes);
}

#[test]
fn flags_come_from_the_environment_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::try_start_with(dir.path(), &[], |command| {
        command.env("ROOM_ALLOCATOR_MAX_ROOM", "0");
    });
    let Err(failure) = server else {
        panic!("ROOM_ALLOCATOR_MAX_ROOM=0 was accepted");
    };
    assert!(failure.log.contains("--max-room"), "{}", failure.log);
}

#[tokio::test]
async fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &["--log-format", "json"]);
    let mut client = server.client().await;
    timed(client.allocate_room(allocate("json", 0, 1)))
        .await
        .expect("allocate");
    let _ = timed(client.allocate_room(allocate("unknown-worker", 0, 0))).await;
    // Let the log reader take the last lines.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let log = server.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    assert!(lines
        .iter()
        .any(|l| l["message"] == "listening" && l["grpc_addr"].is_string()));
    // A refused request: at info, one "message" key, plain JSON values.
    let refused = log
        .lines()
        .find(|line| line.contains("request refused"))
        .unwrap_or_else(|| panic!("no refusal logged in\n{log}"));
    assert_eq!(refused.matches("\"message\":").count(), 1, "{refused}");
    let refused: serde_json::Value = serde_json::from_str(refused).expect("JSON");
    assert_eq!(refused["level"], "INFO");
    assert_eq!(refused["code"], "NOT_FOUND");
    assert!(refused["error"]
        .as_str()
        .expect("error")
        .contains("not registered"));
    // Numbers are numbers, not Debug strings.
    let reserved = lines
        .iter()
        .find(|l| l["message"] == "reserved range")
        .expect("a reservation logged");
    assert!(
        reserved["start"].is_u64() && reserved["dp_size"].is_u64(),
        "{reserved}"
    );
}

#[tokio::test]
async fn an_oversized_request_is_refused_and_the_server_carries_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &[]);
    let mut client = server.client().await;
    let refused = timed(client.register_worker(register(&"x".repeat(100 * 1024), 1)))
        .await
        .expect_err("a 100 KiB request");
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
    timed(client.register_worker(register("after", 1)))
        .await
        .expect("still serving");
}
