//! `RoomClient` (the `room-allocator-client` crate) against the real binary:
//! rooms with almost no RPCs, unique and rank-aligned across clones and
//! tasks; the builder's token, TLS, mutual TLS, deadline, keep-alive and
//! failover; deregistration, paging, the raw calls; what a client learns of a
//! realignment made by another client, and when; and the example router.

use crate::common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::pki::Pki;
use common::proxy::Proxy;
use common::{peers, timed, unique_prefix, EtcdProcess, ServerProcess};
use room_allocator::client::{Error, RoomClient};
use tonic::Code;

fn metric(server: &ServerProcess, line_start: &str) -> u64 {
    common::http_get(server.metrics_addr, "/metrics")
        .lines()
        .find(|line| line.starts_with(line_start))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
        .unwrap_or(0)
}

fn start(dir: &std::path::Path, args: &[String]) -> ServerProcess {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ServerProcess::start(dir, &args)
}

/// The error's code, and its text for messages.
fn code_of<T: std::fmt::Debug>(result: Result<T, Error>) -> (Code, String) {
    match result {
        Ok(value) => panic!("expected an error, got {value:?}"),
        Err(error) => (error.code(), error.to_string()),
    }
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
async fn every_call_types_a_mismatch_with_the_registered_dp_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &[]);
    let client = timed(RoomClient::connect(server.url()))
        .await
        .expect("connect");
    timed(client.register("six", 6)).await.expect("register");
    let mismatch = |result: Result<_, Error>, call: &str| match result {
        Err(Error::DpSizeMismatch {
            worker,
            registered: 6,
            requested: 4,
        }) => assert_eq!(worker, "six", "{call}"),
        other => panic!("{call}: expected a typed mismatch, got {other:?}"),
    };
    mismatch(
        timed(client.allocate("six", 1, 4)).await.map(|_| ()),
        "allocate",
    );
    mismatch(
        timed(client.allocate_room("six", 1, 4)).await.map(|_| ()),
        "allocate_room",
    );
    mismatch(
        timed(client.lease_rooms("six", 10, 4)).await.map(|_| ()),
        "lease_rooms",
    );
    let error = timed(client.allocate("six", 1, 4))
        .await
        .expect_err("still");
    assert_eq!(error.code(), Code::FailedPrecondition);
    assert!(error.to_string().contains("dp_size 6"), "{error}");
    assert_eq!(client.try_allocate("six", 1, 4), None);
}

#[tokio::test]
async fn raw_lease_rooms_and_allocate_room_return_aligned_numbers_that_resolve() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &[]);
    let client = timed(RoomClient::connect(server.url()))
        .await
        .expect("connect");
    timed(client.register("raw", 4)).await.expect("register");

    let lease = timed(client.lease_rooms("raw", 10, 4))
        .await
        .expect("lease");
    assert_eq!((lease.count, lease.dp_size), (10, 4));
    assert_eq!(lease.first_base % 4, 0, "{lease:?}");
    assert!(lease.first_base > 0);
    assert!(lease.valid_for > Duration::from_secs(60), "{lease:?}");
    // dp_size 0 means "as registered".
    let as_registered = timed(client.lease_rooms("raw", 5, 0)).await.expect("lease");
    assert_eq!(as_registered.dp_size, 4);
    assert!(
        as_registered.first_base >= lease.first_base + 10 * 4,
        "leases never overlap: {lease:?} then {as_registered:?}"
    );
    let last = lease.first_base + 9 * 4 + 3;
    let resolved = timed(client.resolve(last)).await.expect("resolve");
    assert_eq!(
        (
            resolved.prefill_worker.as_str(),
            resolved.dp_rank,
            resolved.dp_size
        ),
        ("raw", 3, 4)
    );

    let (room, dp_size) = timed(client.allocate_room("raw", 2, 0))
        .await
        .expect("allocate_room");
    assert_eq!((room % 4, dp_size), (2, 4));
    let (other, _) = timed(client.allocate_room("raw", 2, 4))
        .await
        .expect("allocate_room");
    assert_ne!(room, other);

    // AllocateRoom with a dp_size registers a worker never registered (no
    // token configured on this server).
    let (room, dp_size) = timed(client.allocate_room("new-by-allocate", 4, 5))
        .await
        .expect("registers");
    assert_eq!((room % 5, dp_size), (4, 5));
    let workers = timed(client.workers()).await.expect("workers");
    assert!(
        workers
            .iter()
            .any(|w| w.prefill_worker == "new-by-allocate" && w.dp_size == 5),
        "{workers:?}"
    );
    // Without a dp_size there is nothing to register it with.
    let (code, _) = code_of(timed(client.allocate_room("never", 0, 0)).await);
    assert_eq!(code, Code::NotFound);
    let (code, _) = code_of(timed(client.lease_rooms("never", 1, 3)).await);
    assert_eq!(code, Code::NotFound, "LeaseRooms never registers");
}

#[tokio::test]
async fn deregister_stops_allocation_drops_the_lease_and_register_brings_the_worker_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &[]);
    let client = timed(RoomClient::connect(server.url()))
        .await
        .expect("connect");
    timed(client.register("gone", 2)).await.expect("register");
    let before = timed(client.allocate("gone", 1, 2)).await.expect("room");
    assert!(
        client.try_allocate("gone", 1, 2).is_some(),
        "a lease is held"
    );

    timed(client.deregister("gone")).await.expect("deregister");
    assert_eq!(client.try_allocate("gone", 1, 2), None, "lease dropped");
    match timed(client.allocate("gone", 1, 2)).await {
        Err(Error::Deregistered { worker }) => assert_eq!(worker, "gone"),
        other => panic!("expected Deregistered, got {other:?}"),
    }
    assert!(matches!(
        timed(client.allocate_room("gone", 0, 2)).await,
        Err(Error::Deregistered { .. })
    ));
    assert!(matches!(
        timed(client.lease_rooms("gone", 4, 0)).await,
        Err(Error::Deregistered { .. })
    ));
    let listed = timed(client.workers()).await.expect("workers");
    assert!(
        listed.iter().all(|w| w.prefill_worker != "gone"),
        "{listed:?}"
    );
    // Its rooms still resolve.
    assert_eq!(
        timed(client.resolve(before))
            .await
            .expect("resolve")
            .prefill_worker,
        "gone"
    );
    let (code, _) = code_of(timed(client.deregister("never-registered")).await);
    assert_eq!(code, Code::NotFound);

    timed(client.register("gone", 2)).await.expect("again");
    let after = timed(client.allocate("gone", 1, 2)).await.expect("room");
    assert_eq!(after % 2, 1);
    assert!(after > before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_pages_through_more_than_a_thousand_workers() {
    const WORKERS: usize = 1200;
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &[]);
    let client = timed(RoomClient::connect(server.url()))
        .await
        .expect("connect");
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..WORKERS {
        let client = client.clone();
        tasks.spawn(async move {
            let dp_size = u32::try_from(i % 8 + 1).expect("small");
            client
                .register(&format!("prefill-{i:04}"), dp_size)
                .await
                .map(|info| (info, dp_size))
        });
    }
    let registered = timed(async {
        let mut n = 0;
        while let Some(joined) = tasks.join_next().await {
            let (info, dp_size) = joined.expect("join").expect("register");
            assert_eq!(info.dp_size, dp_size);
            n += 1;
        }
        n
    })
    .await;
    assert_eq!(registered, WORKERS);
    let workers = timed(client.workers()).await.expect("workers");
    assert_eq!(workers.len(), WORKERS, "every page");
    let names: Vec<&str> = workers.iter().map(|w| w.prefill_worker.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(names, sorted, "sorted by name, none twice");
    assert_eq!(workers[1199].prefill_worker, "prefill-1199");
    assert_eq!(workers[1199].dp_size, 1199 % 8 + 1);
}

#[tokio::test]
async fn the_bearer_token_is_sent_on_every_call_and_its_absence_is_unauthenticated() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-admin\n").expect("write");
    let token_path = token_file.to_str().expect("utf-8").to_owned();
    let data = dir.path().join("data");
    let server = start(
        &data,
        &[
            "--auth-token-file".into(),
            token_path.clone(),
            "--allow-unauthenticated-allocation".into(),
        ],
    );

    let admin = timed(
        RoomClient::builder([server.url()])
            .bearer_token("s3cret-admin")
            .connect(),
    )
    .await
    .expect("connect");
    let anonymous = timed(RoomClient::connect(server.url()))
        .await
        .expect("connect");
    let wrong = timed(
        RoomClient::builder([server.url()])
            .bearer_token("guess")
            .connect(),
    )
    .await
    .expect("connect");

    timed(admin.register("guarded", 4))
        .await
        .expect("register with the token");
    for client in [&anonymous, &wrong] {
        let (code, text) = code_of(timed(client.register("guarded", 4)).await);
        assert_eq!(code, Code::Unauthenticated, "{text}");
        let (code, _) = code_of(timed(client.deregister("guarded")).await);
        assert_eq!(code, Code::Unauthenticated);
    }

    // Allocation needs no token where the server opens it.
    let room = timed(anonymous.allocate("guarded", 3, 4))
        .await
        .expect("allocate without a token");
    assert_eq!(room % 4, 3);
    // But registering through AllocateRoom is an admin act: refused, and
    // nothing registered.
    let (code, text) = code_of(timed(anonymous.allocate_room("sneaky", 1, 2)).await);
    assert_eq!(code, Code::Unauthenticated, "{text}");
    let (code, text) = code_of(timed(anonymous.allocate("sneaky", 1, 2)).await);
    assert_eq!(code, Code::Unauthenticated, "{text}");
    let workers = timed(admin.workers()).await.expect("workers");
    assert!(
        workers.iter().all(|w| w.prefill_worker != "sneaky"),
        "{workers:?}"
    );
    let (room, _) = timed(admin.allocate_room("by-admin", 1, 2))
        .await
        .expect("the token lets AllocateRoom register");
    assert_eq!(room % 2, 1);
    drop(server);

    let strict = start(
        &data,
        &[
            "--auth-token-file".into(),
            token_path,
            "--auth-required-for-allocation".into(),
        ],
    );
    let anonymous = timed(RoomClient::connect(strict.url()))
        .await
        .expect("connect");
    let (code, _) = code_of(timed(anonymous.allocate("guarded", 3, 4)).await);
    assert_eq!(code, Code::Unauthenticated);
    let (code, _) = code_of(timed(anonymous.resolve(room)).await);
    assert_eq!(code, Code::Unauthenticated);
    let admin = timed(
        RoomClient::builder([strict.url()])
            .bearer_token("s3cret-admin")
            .connect(),
    )
    .await
    .expect("connect");
    let room = timed(admin.allocate("guarded", 3, 4))
        .await
        .expect("allocate with the token");
    assert_eq!(room % 4, 3);
    assert_eq!(
        timed(admin.resolve(room)).await.expect("resolve").dp_rank,
        3
    );
}

#[tokio::test]
async fn tls_verifies_the_server_with_the_ca_and_host_port_then_means_https() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path(), &pki.server_args(false));
    let port = server.grpc_addr.port();
    for endpoint in [
        format!("https://localhost:{port}"),
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
    ] {
        let client = timed(
            RoomClient::builder([&endpoint])
                .ca_certificate_pem(pki.read("ca.crt"))
                .connect(),
        )
        .await
        .unwrap_or_else(|e| panic!("{endpoint}: {e}"));
        let room = timed(client.allocate("tls", 1, 2)).await.expect("room");
        assert_eq!(room % 2, 1);
        assert_eq!(
            timed(client.resolve(room)).await.expect("resolve").dp_size,
            2
        );
    }
    // Without the CA the server's certificate is not trusted.
    let untrusted = timed(
        RoomClient::builder([format!("https://localhost:{port}")])
            .connect_patience(Duration::from_millis(200))
            .connect(),
    )
    .await;
    let (code, text) = code_of(untrusted);
    assert_eq!(code, Code::Unavailable);
    assert!(text.contains("certificate"), "{text}");
    // A plaintext client on the TLS port fails, and says why.
    let plaintext = RoomClient::builder([format!("http://127.0.0.1:{port}")])
        .connect_patience(Duration::from_millis(200))
        .connect()
        .await;
    let text = match plaintext {
        Err(error) => error.to_string(),
        Ok(client) => timed(client.allocate_room("tls", 1, 2))
            .await
            .expect_err("plaintext on a TLS port")
            .to_string(),
    };
    assert!(text.contains("HTTP/2") || text.contains("TLS"), "{text}");
}

#[tokio::test]
async fn mutual_tls_needs_the_client_identity() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path(), &pki.server_args(true));
    let endpoint = format!("localhost:{}", server.grpc_addr.port());
    let client = timed(
        RoomClient::builder([&endpoint])
            .ca_certificate_pem(pki.read("ca.crt"))
            .client_identity_pem(pki.read("client.crt"), pki.read("client.key"))
            .connect(),
    )
    .await
    .expect("mTLS connect");
    timed(client.register("mtls", 2)).await.expect("register");
    assert_eq!(
        timed(client.allocate("mtls", 1, 2)).await.expect("room") % 2,
        1
    );

    // Without an identity the server refuses; whether the handshake or the
    // first call notices, the error says it is about the certificate.
    for _ in 0..3 {
        let anonymous = timed(
            RoomClient::builder([&endpoint])
                .ca_certificate_pem(pki.read("ca.crt"))
                .connect_patience(Duration::from_millis(200))
                .connect(),
        )
        .await;
        let error = match anonymous {
            Err(error) => error,
            Ok(client) => timed(client.allocate_room("mtls", 1, 2))
                .await
                .expect_err("no client certificate"),
        };
        let text = error.to_string();
        assert!(text.contains("certificate"), "{text}");
        assert_ne!(error.code(), Code::Ok);
    }
}

#[tokio::test]
async fn a_call_to_a_frozen_server_fails_at_the_clients_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &[]);
    let client = timed(
        RoomClient::builder([server.url()])
            .timeout(Duration::from_millis(500))
            .connect(),
    )
    .await
    .expect("connect");
    timed(client.register("frozen", 2)).await.expect("register");
    server.freeze();
    let started = Instant::now();
    let result = timed(client.allocate_room("frozen", 1, 2)).await;
    let elapsed = started.elapsed();
    server.thaw();
    let (code, text) = code_of(result);
    assert!(
        matches!(code, Code::DeadlineExceeded | Code::Unavailable),
        "{code:?}: {text}"
    );
    assert!(
        elapsed >= Duration::from_millis(400) && elapsed < Duration::from_secs(3),
        "failed after {elapsed:?}, the deadline is 500 ms"
    );
    assert!(
        Error::Status(tonic::Status::new(code, "")).is_retryable(),
        "a deadline is worth retrying"
    );
    // Thawed, the same client carries on.
    let room = timed(client.allocate("frozen", 1, 2))
        .await
        .expect("after thaw");
    assert_eq!(room % 2, 1);
}

#[tokio::test]
async fn keep_alive_connects_and_notices_a_frozen_server_before_the_deadline() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &[]);
    let client = timed(
        RoomClient::builder([server.url()])
            .keep_alive(Duration::from_millis(200), Duration::from_millis(300))
            .timeout(Duration::from_secs(15))
            .connect(),
    )
    .await
    .expect("connect");
    timed(client.register("alive", 2)).await.expect("register");
    // Idle pings keep an idle connection open.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        timed(client.allocate_room("alive", 0, 2))
            .await
            .expect("room")
            .0
            % 2,
        0
    );
    server.freeze();
    let started = Instant::now();
    let result = timed(client.allocate_room("alive", 1, 2)).await;
    let elapsed = started.elapsed();
    server.thaw();
    let (code, text) = code_of(result);
    assert_eq!(code, Code::Unavailable, "{text}");
    assert!(
        elapsed < Duration::from_secs(5),
        "keep-alive noticed the frozen server after {elapsed:?} (deadline 15 s)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_beside_a_live_one_is_skipped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &[]);
    let dead = format!("http://{}", peers::dead_addr());
    for endpoints in [[dead.clone(), server.url()], [server.url(), dead.clone()]] {
        let client = timed(
            RoomClient::builder(&endpoints)
                .timeout(Duration::from_secs(2))
                .connect(),
        )
        .await
        .unwrap_or_else(|e| panic!("{endpoints:?}: {e}"));
        timed(client.register("failover", 4))
            .await
            .expect("register");
        let mut rooms = HashSet::new();
        for i in 0..200u32 {
            let (room, _) = timed(client.allocate_room("failover", i % 4, 4))
                .await
                .unwrap_or_else(|e| panic!("{endpoints:?} call {i}: {e}"));
            assert!(rooms.insert(room));
        }
        for i in 0..2000u32 {
            let room = timed(client.allocate("failover", i % 4, 4))
                .await
                .unwrap_or_else(|e| panic!("{endpoints:?} allocate {i}: {e}"));
            assert_eq!(room % 4, u64::from(i % 4));
            assert!(rooms.insert(room), "room {room} twice");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_replicas_on_etcd_allocation_continues_when_one_is_killed() {
    let Some(etcd) = EtcdProcess::start() else {
        return;
    };
    let prefix = unique_prefix("client-failover");
    let replica = || {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = ServerProcess::start(
            &dir.path().join("unused"),
            &["--etcd-endpoints", &etcd.endpoint, "--etcd-prefix", &prefix],
        );
        (server, dir)
    };
    let (mut first, _first_dir) = replica();
    let (second, _second_dir) = replica();
    let client = timed(
        RoomClient::builder([first.url(), second.url()])
            .timeout(Duration::from_secs(2))
            .connect(),
    )
    .await
    .expect("connect");
    timed(client.register("ha", 4)).await.expect("register");
    let mut rooms = HashSet::new();
    let mut take = |room: u64, rank: u32| {
        assert_eq!(room % 4, u64::from(rank));
        assert!(rooms.insert(room), "room {room} twice");
    };
    for i in 0..2000u32 {
        take(
            timed(client.allocate("ha", i % 4, 4)).await.expect("room"),
            i % 4,
        );
    }
    for i in 0..50u32 {
        take(
            timed(client.allocate_room("ha", i % 4, 4))
                .await
                .expect("room")
                .0,
            i % 4,
        );
    }
    first.kill9();
    for i in 0..50u32 {
        let (room, _) = timed(client.allocate_room("ha", i % 4, 4))
            .await
            .unwrap_or_else(|e| panic!("AllocateRoom {i} after the kill: {e}"));
        take(room, i % 4);
    }
    for i in 0..5000u32 {
        let room = timed(client.allocate("ha", i % 4, 4))
            .await
            .unwrap_or_else(|e| panic!("allocate {i} after the kill: {e}"));
        take(room, i % 4);
    }
    let last = *rooms.iter().max().expect("rooms");
    let resolved = timed(client.resolve(last)).await.expect("resolve");
    assert_eq!(
        (resolved.prefill_worker.as_str(), resolved.dp_size),
        ("ha", 4)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_cut_off_from_etcd_answers_unavailable_and_calls_move_to_the_other() {
    let Some(etcd) = EtcdProcess::start() else {
        return;
    };
    let prefix = unique_prefix("client-partition");
    let proxy = Proxy::start(etcd.addr()).await;
    let replica = |endpoint: &str| {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = ServerProcess::start(
            &dir.path().join("unused"),
            &[
                "--etcd-endpoints",
                endpoint,
                "--etcd-prefix",
                &prefix,
                "--store-timeout-secs",
                "1",
                "--etcd-staleness-secs",
                "2",
            ],
        );
        (server, dir)
    };
    let (cut_off, _cut_off_dir) = replica(&proxy.url());
    let (healthy, _healthy_dir) = replica(&etcd.endpoint);
    let client = timed(
        RoomClient::builder([cut_off.url(), healthy.url()])
            .timeout(Duration::from_secs(3))
            .connect(),
    )
    .await
    .expect("connect");
    timed(client.register("part", 2)).await.expect("register");
    let mut rooms = HashSet::new();
    for i in 0..20u32 {
        let (room, _) = timed(client.allocate_room("part", i % 2, 2))
            .await
            .expect("room");
        assert!(rooms.insert(room));
    }

    proxy.cut();
    // Past its staleness window the cut-off replica refuses to hand out rooms.
    let alone = timed(RoomClient::connect(cut_off.url()))
        .await
        .expect("connect");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match timed(alone.allocate_room("part", 0, 2)).await {
            Err(error) if error.code() == Code::Unavailable => break,
            Ok((room, _)) => assert!(rooms.insert(room), "room {room} twice"),
            Err(error) => panic!("expected UNAVAILABLE, got {error}"),
        }
        assert!(
            Instant::now() < deadline,
            "the cut-off replica kept serving"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The client with both endpoints goes on through the other one.
    for i in 0..50u32 {
        let (room, _) = timed(client.allocate_room("part", i % 2, 2))
            .await
            .unwrap_or_else(|e| panic!("AllocateRoom {i} with one replica cut off: {e}"));
        assert!(rooms.insert(room), "room {room} twice");
    }
    for i in 0..1000u32 {
        let room = timed(client.allocate("part", i % 2, 2))
            .await
            .unwrap_or_else(|e| panic!("allocate {i} with one replica cut off: {e}"));
        assert_eq!(room % 2, u64::from(i % 2));
        assert!(rooms.insert(room), "room {room} twice");
    }
}

/// A realignment by another client reaches a client holding a lease at its
/// next refill (LeaseRooms carries the caller's dp_size), as a typed error.
#[tokio::test]
async fn another_clients_realignment_is_learned_at_the_next_refill() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &[]);
    let router = timed(RoomClient::connect(server.url()))
        .await
        .expect("connect");
    let admin = timed(RoomClient::connect(server.url()))
        .await
        .expect("connect");
    timed(admin.register("moving", 4)).await.expect("register");
    let first = timed(router.allocate("moving", 1, 4)).await.expect("room");
    timed(admin.register("moving", 8)).await.expect("realign");

    // Rooms from the lease taken before the realignment are still aligned to
    // the dp_size they were issued under; then the refill says no.
    let mut old = vec![first];
    let error = loop {
        match timed(router.allocate("moving", 1, 4)).await {
            Ok(room) => {
                old.push(room);
                assert!(old.len() < 2000, "the realignment never reached the client");
            }
            Err(error) => break error,
        }
    };
    match error {
        Error::DpSizeMismatch {
            registered: 8,
            requested: 4,
            ..
        } => {}
        other => panic!("expected a typed mismatch, got {other:?}"),
    }
    assert_eq!(router.try_allocate("moving", 1, 4), None, "lease dropped");
    // It was LeaseRooms, sent with the router's dp_size, that said so.
    assert!(
        metric(
            &server,
            "room_allocator_requests_total{method=\"LeaseRooms\",code=\"FAILED_PRECONDITION\"}"
        ) >= 1
    );
    assert_eq!(
        metric(
            &server,
            "room_allocator_requests_total{method=\"AllocateRoom\",code=\"FAILED_PRECONDITION\"}"
        ),
        0
    );
    for room in [old[0], old[old.len() / 2], old[old.len() - 1]] {
        let resolved = timed(router.resolve(room)).await.expect("resolve");
        assert_eq!((room % 4, resolved.dp_size, resolved.dp_rank), (1, 4, 1));
    }
    let room = timed(router.allocate("moving", 5, 8))
        .await
        .expect("new size");
    assert_eq!(room % 8, 5);
    assert_eq!(
        timed(router.resolve(room)).await.expect("resolve").dp_size,
        8
    );
}

/// With a short `max_lease_age`, a realignment reaches a client within about
/// that age even when nothing triggers a refill; no room from an expired
/// lease is ever returned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_is_never_used_and_the_realignment_arrives_within_max_lease_age() {
    const MAX_LEASE_AGE: Duration = Duration::from_millis(700);
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &[]);
    let router = timed(
        RoomClient::builder([server.url()])
            .max_lease_age(MAX_LEASE_AGE)
            .connect(),
    )
    .await
    .expect("connect");
    let admin = timed(RoomClient::connect(server.url()))
        .await
        .expect("connect");
    timed(admin.register("aging", 2)).await.expect("register");
    let leased_at = Instant::now();
    let before = timed(router.allocate("aging", 1, 2)).await.expect("room");
    assert!(router.try_allocate("aging", 1, 2).is_some(), "lease held");

    timed(admin.register("aging", 3)).await.expect("realign");
    let realigned_at = Instant::now();
    // Only the lease's age can tell the router: at this pace it never runs
    // low enough to refill. It uses the rooms it holds, then none.
    let mut from_old_lease = vec![before];
    while let Some(room) = router.try_allocate("aging", 1, 2) {
        // Expiry runs on a timer, not on the hot path: allow it a little.
        assert!(
            leased_at.elapsed() < MAX_LEASE_AGE + Duration::from_millis(250),
            "room {room} from a lease {:?} old, past max_lease_age",
            leased_at.elapsed()
        );
        from_old_lease.push(room);
        assert!(from_old_lease.len() < 120, "no refill at this pace");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let learned_after = realigned_at.elapsed();
    assert!(
        learned_after < MAX_LEASE_AGE + Duration::from_millis(250),
        "the old lease was still used {learned_after:?} after the realignment"
    );
    match timed(router.allocate("aging", 1, 2)).await {
        Err(Error::DpSizeMismatch {
            registered: 3,
            requested: 2,
            ..
        }) => {}
        other => panic!("expected the realignment to be learned, got {other:?}"),
    }
    // Every room handed out before was issued under dp_size 2 and resolves so.
    for room in [from_old_lease[0], *from_old_lease.last().expect("a room")] {
        let resolved = timed(router.resolve(room)).await.expect("resolve");
        assert_eq!((room % 2, resolved.dp_size), (1, 2));
    }
    // Rooms obtained now are aligned to the new size, and resolve agrees.
    for rank in 0..3 {
        let room = timed(router.allocate("aging", rank, 3))
            .await
            .expect("new size");
        assert_eq!(room % 3, u64::from(rank));
        let resolved = timed(router.resolve(room)).await.expect("resolve");
        assert_eq!((resolved.dp_rank, resolved.dp_size), (rank, 3));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn try_allocate_never_blocks_even_on_a_frozen_server() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &[]);
    let client = timed(
        RoomClient::builder([server.url()])
            .timeout(Duration::from_secs(5))
            .connect(),
    )
    .await
    .expect("connect");
    timed(client.register("sync", 4)).await.expect("register");
    assert_eq!(client.try_allocate("sync", 0, 4), None, "no lease yet");
    timed(client.allocate("sync", 0, 4)).await.expect("room");
    server.freeze();
    let started = Instant::now();
    let mut some = 0;
    let mut rooms = HashSet::new();
    // Far more than a lease: the refills it starts hang on the frozen
    // server, and try_allocate must not wait for them.
    for i in 0..100_000u32 {
        if let Some(room) = client.try_allocate("sync", i % 4, 4) {
            assert_eq!(room % 4, u64::from(i % 4));
            assert!(rooms.insert(room));
            some += 1;
        }
        assert_eq!(client.try_allocate("unknown", 0, 1), None);
        assert_eq!(client.try_allocate("sync", 4, 4), None, "rank out of range");
    }
    let elapsed = started.elapsed();
    server.thaw();
    assert!(some > 0, "the lease served some rooms");
    assert!(
        elapsed < Duration::from_secs(2),
        "300000 try_allocate calls took {elapsed:?} with the server frozen"
    );
}

#[tokio::test]
async fn connect_retries_until_the_server_is_up() {
    let port = peers::dead_addr().port();
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
    match refused {
        Err(Error::Connect { reason, .. }) => {
            assert!(reason.contains("Connection refused"), "{reason}")
        }
        other => panic!("expected a connect error, got {other:?}"),
    }
}

#[test]
fn the_pd_router_example_plays_both_halves_with_a_token_and_a_stale_dp_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "pd-router-token\n").expect("write");
    let server = ServerProcess::start(
        &dir.path().join("data"),
        &["--auth-token-file", token_file.to_str().expect("utf-8")],
    );
    let example = common::example("room-allocator", "pd_router");
    let output = std::process::Command::new(&example)
        .arg(server.url())
        .arg("--token-file")
        .arg(&token_file)
        .output()
        .expect("run the pd_router example");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("decode pulls from prefill rank 3"),
        "{stdout}"
    );
    assert!(
        stdout.contains("ResolveRank: worker prefill-0.example:8998"),
        "{stdout}"
    );
    assert!(
        stdout.contains("registered with dp_size 8"),
        "the mismatch path: {stdout}"
    );

    // Without the token, registering is refused, and the example says so.
    let output = std::process::Command::new(&example)
        .arg(server.url())
        .output()
        .expect("run the pd_router example");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("UNAUTHENTICATED"), "{stderr}");
}

/// Runs `work` in a child forked from this (multi-threaded) process and
/// returns the child's pid and the read end of a pipe carrying its report.
/// The child never returns into the test harness: it exits with `_exit`.
fn in_forked_child(work: impl FnOnce() -> String) -> (libc::pid_t, std::fs::File) {
    use std::io::Write;
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe() fills the two-element array it is given.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0, "pipe");
    // SAFETY: the child runs only `work` (its own tokio runtime, the copied
    // client, a pipe) and leaves with _exit, never unwinding into the harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        let report = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
            .unwrap_or_else(|_| "the child panicked".to_owned());
        // SAFETY: fds[1] is the pipe's write end, owned by this File only.
        let mut out = unsafe { std::fs::File::from_raw_fd(fds[1]) };
        let _ = out.write_all(report.as_bytes());
        drop(out);
        // SAFETY: ends the child at once, without running the parent's
        // destructors or atexit handlers twice.
        unsafe { libc::_exit(0) };
    }
    // SAFETY: the parent's copy of the write end, unused here; the read end
    // is owned by the returned File only.
    unsafe {
        libc::close(fds[1]);
        (pid, std::fs::File::from_raw_fd(fds[0]))
    }
}

/// The child's report, or a panic if it sent none within 20 s (then the
/// child is killed); the child is reaped either way.
fn report_of(pid: libc::pid_t, mut pipe: std::fs::File) -> String {
    use std::io::Read;
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut report = String::new();
        let _ = pipe.read_to_string(&mut report);
        let _ = sender.send(report);
    });
    let report = receiver.recv_timeout(Duration::from_secs(20));
    if report.is_err() {
        // SAFETY: pid is this test's own child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let mut status = 0;
    // SAFETY: waits for this test's own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    report.expect("the forked child sent no report within 20 s (it hangs)")
}

fn rooms_in(line: &str) -> Vec<u64> {
    line.split(',')
        .filter(|room| !room.is_empty())
        .map(|room| room.parse().expect("a room"))
        .collect()
}

/// fork() copies a client into the child, leases included, but none of the
/// threads of the runtime that drives its connections. The copy must hand
/// out no room (its parent hands out the same ones) and fail at once rather
/// than hang; a client the child builds itself works.
#[test]
fn a_client_copied_by_fork_hands_out_no_room_in_the_child_and_a_new_one_works() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &[]);
    let url = server.url();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let client = runtime.block_on(async {
        let client = timed(RoomClient::connect(&url)).await.expect("connect");
        timed(client.register("p", 4)).await.expect("register");
        for i in 0..8u32 {
            timed(client.allocate("p", i % 4, 4)).await.expect("room");
        }
        client
    });

    let copied = client.clone();
    let (pid, pipe) = in_forked_child(move || {
        let taken: Vec<String> = (0..40u32)
            .filter_map(|i| copied.try_allocate("p", i % 4, 4))
            .map(|room| room.to_string())
            .collect();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime in the child");
        let allocated = runtime.block_on(async {
            match tokio::time::timeout(Duration::from_secs(5), copied.allocate("p", 1, 4)).await {
                Err(_) => "hung".to_owned(),
                Ok(Ok(room)) => format!("room {room}"),
                Ok(Err(error)) => format!("{:?}: {error}", error.code()),
            }
        });
        let fresh = runtime.block_on(async {
            let own = RoomClient::connect(&url)
                .await
                .expect("connect in the child");
            let mut rooms = Vec::new();
            for i in 0..40u32 {
                rooms.push(
                    own.allocate("p", i % 4, 4)
                        .await
                        .expect("room in the child")
                        .to_string(),
                );
            }
            rooms
        });
        format!("{}\n{allocated}\n{}", taken.join(","), fresh.join(","))
    });
    let parent: Vec<u64> = runtime.block_on(async {
        let mut rooms = Vec::new();
        for i in 0..40u32 {
            rooms.push(timed(client.allocate("p", i % 4, 4)).await.expect("room"));
        }
        rooms
    });
    let report = report_of(pid, pipe);
    let lines: Vec<&str> = report.lines().collect();
    assert_eq!(lines.len(), 3, "the child reported: {report}");
    let taken = rooms_in(lines[0]);
    let shared: Vec<u64> = taken
        .iter()
        .copied()
        .filter(|room| parent.contains(room))
        .collect();
    assert!(
        taken.is_empty(),
        "the copied client handed out {} rooms in the child, {} of them also the parent's (e.g. {:?})",
        taken.len(),
        shared.len(),
        &shared[..shared.len().min(5)]
    );
    assert!(
        lines[1].starts_with("FailedPrecondition: "),
        "allocate on the copied client in the child: {}",
        lines[1]
    );
    let fresh = rooms_in(lines[2]);
    assert_eq!(fresh.len(), 40);
    let all: HashSet<u64> = parent.iter().chain(&fresh).copied().collect();
    assert_eq!(
        all.len(),
        80,
        "a room of the child's own client was the parent's too"
    );
}
