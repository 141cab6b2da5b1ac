//! The worker lifecycle at fleet scale, through the real binary:
//! deregistration that sticks and is forgotten once nothing needs it,
//! --max-workers counting registered workers only, registration through
//! AllocateRoom as an admin act, names without control characters, paged
//! ListWorkers under churn from several processes, disjoint room spaces
//! with --min-room/--max-room, and the bound on one LeaseRooms call.

use crate::common;

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use common::{run_cli, timed, ServerProcess};
use room_allocator::pb;
use tonic::{Code, Status};

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

fn reason(status: &Status) -> Option<&str> {
    status.metadata().get("error-reason")?.to_str().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deregistered_worker_gets_no_rooms_frees_its_slot_and_is_forgotten_after_retention() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &["--max-workers", "2", "--retention", "1s"]);
    let mut client = server.client().await;
    for worker in ["a", "b"] {
        timed(client.register_worker(register(worker, 2)))
            .await
            .expect("register");
    }
    let full = timed(client.register_worker(register("c", 2)))
        .await
        .expect_err("over --max-workers");
    assert_eq!(full.code(), Code::ResourceExhausted);
    assert_eq!(reason(&full), Some("TOO_MANY_WORKERS"));
    let old = timed(client.allocate_room(allocate("a", 1, 2)))
        .await
        .expect("allocate")
        .into_inner()
        .room;

    timed(client.deregister_worker(pb::DeregisterWorkerRequest {
        prefill_worker: "a".into(),
    }))
    .await
    .expect("deregister");
    // Whatever dp_size a stale router passes, no room, and no re-registration.
    for dp_size in [0, 2, 4] {
        let refused = timed(client.allocate_room(allocate("a", 0, dp_size)))
            .await
            .expect_err("deregistered");
        assert_eq!(refused.code(), Code::FailedPrecondition);
        assert_eq!(reason(&refused), Some("WORKER_DEREGISTERED"));
        let refused = timed(client.lease_rooms(pb::LeaseRoomsRequest {
            prefill_worker: "a".into(),
            count: 4,
            dp_size,
        }))
        .await
        .expect_err("deregistered");
        assert_eq!(reason(&refused), Some("WORKER_DEREGISTERED"));
    }
    // Its slot is free.
    timed(client.register_worker(register("c", 2)))
        .await
        .expect("a deregistered worker does not count");
    // Its rooms still resolve while their range is kept...
    let resolved = timed(client.resolve_rank(pb::ResolveRankRequest { room: old }))
        .await
        .expect("resolves")
        .into_inner();
    assert_eq!(resolved.prefill_worker, "a");
    // ...and once retention pruned its ranges, the worker is forgotten: a
    // worker of that name is new again (AllocateRoom with a dp_size
    // registers it, were there a free slot; here: the limit, not the stale
    // deregistration, answers).
    let forgotten = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let status = client
                .allocate_room(allocate("a", 0, 2))
                .await
                .expect_err("at the worker limit");
            if reason(&status) == Some("TOO_MANY_WORKERS") {
                return;
            }
            assert_eq!(reason(&status), Some("WORKER_DEREGISTERED"));
        }
    })
    .await;
    assert!(forgotten.is_ok(), "the deregistered worker was forgotten");
    assert!(
        server.log().contains("workers_forgotten=1"),
        "{}",
        server.log()
    );
}

#[tokio::test]
async fn registering_through_allocate_room_needs_the_token_and_registers_nothing_without() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret\n").expect("token");
    // Allocation opened to callers without the token: registering through
    // it still needs the token.
    let server = ServerProcess::start(
        &dir.path().join("data"),
        &[
            "--auth-token-file",
            token_file.to_str().expect("utf-8"),
            "--allow-unauthenticated-allocation",
        ],
    );
    let mut client = server.client().await;
    let refused = timed(client.allocate_room(allocate("implicit", 0, 2)))
        .await
        .expect_err("no token");
    assert_eq!(refused.code(), Code::Unauthenticated);
    assert!(refused.message().contains("register"), "{refused:?}");
    let mut wrong = tonic::Request::new(allocate("implicit", 0, 2));
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer nope".parse().expect("ascii"));
    let refused = timed(client.allocate_room(wrong))
        .await
        .expect_err("wrong token");
    assert_eq!(refused.code(), Code::Unauthenticated);
    let listed = timed(client.list_workers(pb::ListWorkersRequest::default()))
        .await
        .expect("list")
        .into_inner();
    assert!(listed.workers.is_empty(), "nothing was registered");
    let mut with_token = tonic::Request::new(allocate("implicit", 1, 2));
    with_token
        .metadata_mut()
        .insert("authorization", "Bearer s3cret".parse().expect("ascii"));
    let room = timed(client.allocate_room(with_token))
        .await
        .expect("with the token")
        .into_inner()
        .room;
    assert_eq!(room % 2, 1);
    // Registered now: allocation needs no token.
    timed(client.allocate_room(allocate("implicit", 0, 2)))
        .await
        .expect("allocate");
}

#[tokio::test]
async fn names_with_control_characters_are_invalid_and_never_split_a_log_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &[]);
    let mut client = server.client().await;
    let refused = timed(client.register_worker(register("evil\nINFO forged line", 1)))
        .await
        .expect_err("a newline in the name");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("U+000A"), "{refused:?}");
    let refused = timed(client.register_worker(register(&"x".repeat(254), 1)))
        .await
        .expect_err("too long");
    assert_eq!(refused.code(), Code::InvalidArgument);
    timed(client.register_worker(register("prefill-ü:8998", 1)))
        .await
        .expect("UTF-8 without control characters is fine");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = server.log();
    assert!(
        !log.lines().any(|line| line.starts_with("INFO forged line")),
        "{log}"
    );
    let line = log
        .lines()
        .find(|line| line.contains("forged line"))
        .unwrap_or_else(|| panic!("the refusal is logged: {log}"));
    assert!(
        line.contains("request refused") && line.contains("evil\\"),
        "escaped, on one line: {line}"
    );
}

/// A process that registers and deregisters workers while another pages.
#[tokio::test]
#[ignore = "a child process of paging_while_other_processes_churn_never_returns_a_worker_twice"]
async fn churn_process() {
    let url = std::env::var("CHURN_SERVER").expect("CHURN_SERVER");
    let id: u32 = std::env::var("CHURN_ID")
        .expect("CHURN_ID")
        .parse()
        .expect("id");
    let mut client = pb::room_allocator_service_client::RoomAllocatorServiceClient::connect(url)
        .await
        .expect("connect");
    for round in 0..300u32 {
        let name = format!("churn-{id}-{round:04}");
        timed(client.register_worker(register(&name, 1)))
            .await
            .expect("register");
        if round % 2 == 0 {
            timed(client.deregister_worker(pb::DeregisterWorkerRequest {
                prefill_worker: name,
            }))
            .await
            .expect("deregister");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paging_while_other_processes_churn_never_returns_a_worker_twice() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &[]);
    let mut client = server.client().await;
    // 2,500 stable workers, registered concurrently.
    let mut tasks = Vec::new();
    for chunk in 0..25u32 {
        let mut client = client.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..100u32 {
                let name = format!("stable-{:05}", chunk * 100 + i);
                timed(client.register_worker(register(&name, 2)))
                    .await
                    .expect("register");
            }
        }));
    }
    for task in tasks {
        task.await.expect("register task");
    }
    let churners: Vec<_> = (0..2)
        .map(|id| {
            std::process::Command::new(std::env::current_exe().expect("test binary"))
                .args(["lifecycle::churn_process", "--exact", "--ignored"])
                .env("CHURN_SERVER", server.url())
                .env("CHURN_ID", id.to_string())
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("spawn a churn process")
        })
        .collect();
    for _ in 0..3 {
        let mut seen = Vec::new();
        let mut token = String::new();
        let mut pages = 0;
        loop {
            let page = timed(client.list_workers(pb::ListWorkersRequest {
                page_size: 700,
                page_token: token,
            }))
            .await
            .expect("page")
            .into_inner();
            pages += 1;
            assert!(page.workers.len() <= 700);
            seen.extend(page.workers.into_iter().map(|w| w.prefill_worker));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert!(pages >= 4);
        let unique: BTreeSet<&String> = seen.iter().collect();
        assert_eq!(unique.len(), seen.len(), "a worker came twice");
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "sorted by name");
        let stable = seen.iter().filter(|n| n.starts_with("stable-")).count();
        assert_eq!(stable, 2500, "every stable worker, once");
    }
    for mut churner in churners {
        let status = tokio::task::spawn_blocking(move || churner.wait())
            .await
            .expect("join")
            .expect("wait");
        assert!(status.success());
    }
    for (page_size, token, what) in [
        (-1, String::new(), "negative page_size"),
        (0, "not-a-token".to_owned(), "a forged token"),
    ] {
        let refused = timed(client.list_workers(pb::ListWorkersRequest {
            page_size,
            page_token: token,
        }))
        .await
        .expect_err(what);
        assert_eq!(refused.code(), Code::InvalidArgument, "{what}");
    }
    let clamped = timed(client.list_workers(pb::ListWorkersRequest {
        page_size: 1_000_000,
        page_token: String::new(),
    }))
    .await
    .expect("clamped")
    .into_inner();
    assert_eq!(clamped.workers.len(), 2500 + 300);
    // The CLI pages through all of them.
    let (code, out, err) = run_cli(&["workers", "--server", &server.url()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 2800);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_with_disjoint_bounds_never_share_a_room_and_bounds_below_used_space_refuse() {
    let dirs = [
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    ];
    let bounds = [("1", "1000000"), ("1000001", "2000000")];
    let mut all = HashSet::new();
    for (dir, (min, max)) in dirs.iter().zip(bounds) {
        let server = ServerProcess::start(dir.path(), &["--min-room", min, "--max-room", max]);
        let mut client = server.client().await;
        let (min, max): (u64, u64) = (min.parse().expect("min"), max.parse().expect("max"));
        for worker in ["w4", "w8"] {
            let dp_size = if worker == "w4" { 4 } else { 8 };
            for i in 0..300u32 {
                let room = timed(client.allocate_room(allocate(worker, i % dp_size, dp_size)))
                    .await
                    .expect("allocate")
                    .into_inner()
                    .room;
                assert!(
                    (min..=max).contains(&room),
                    "room {room} outside [{min}, {max}]"
                );
                assert!(all.insert(room), "room {room} in both deployments");
            }
            let lease = timed(client.lease_rooms(pb::LeaseRoomsRequest {
                prefill_worker: worker.into(),
                count: 100,
                dp_size,
            }))
            .await
            .expect("lease")
            .into_inner();
            let last = lease.first_base + u64::from(lease.count) * u64::from(dp_size) - 1;
            assert!(lease.first_base >= min && last <= max, "{lease:?}");
        }
    }
    // Lowering --max-room below what the store already used is refused.
    let Err(failure) = ServerProcess::try_start(
        dirs[1].path(),
        &["--min-room", "1000001", "--max-room", "1000002"],
    ) else {
        panic!("started with bounds below the used space");
    };
    assert!(failure.log.contains("--max-room"), "{}", failure.log);
    assert!(failure.log.contains("disjoint"), "{}", failure.log);
    let Err(failure) =
        ServerProcess::try_start(dirs[0].path(), &["--min-room", "10", "--max-room", "5"])
    else {
        panic!("started with min > max");
    };
    assert!(failure.log.contains("--min-room"), "{}", failure.log);
}

#[tokio::test]
async fn one_lease_takes_at_most_two_to_the_24_numbers_and_the_space_used_is_a_gauge() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &[]);
    let mut client = server.client().await;
    timed(client.register_worker(register("wide", 65_536)))
        .await
        .expect("register");
    let refused = timed(client.lease_rooms(pb::LeaseRoomsRequest {
        prefill_worker: "wide".into(),
        count: 257,
        dp_size: 0,
    }))
    .await
    .expect_err("257 * 65536 > 2^24");
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("at most 256"), "{refused:?}");
    let lease = timed(client.lease_rooms(pb::LeaseRoomsRequest {
        prefill_worker: "wide".into(),
        count: 256,
        dp_size: 65_536,
    }))
    .await
    .expect("256 * 65536 = 2^24 is fine")
    .into_inner();
    assert_eq!(lease.count, 256);
    assert!(lease.valid_for_ms >= 12 * 3600 * 1000, "{lease:?}");
    let text = common::http_get(server.metrics_addr, "/metrics");
    let used = text
        .lines()
        .find_map(|line| line.strip_prefix("room_allocator_space_used_rooms "))
        .and_then(|value| value.parse::<f64>().ok())
        .expect("the space gauge");
    assert!(used >= f64::from(1u32 << 24), "{used}");
}
