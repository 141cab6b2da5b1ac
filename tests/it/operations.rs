//! What operators rely on, through the real binary (issue 21): every call
//! counted however it ends, reload gauges that stay 0 while a file is bad,
//! limits on every port, connections recycled so routers reach new
//! replicas, and secure defaults (a configured token guards every call,
//! mTLS clients restricted by name).

use crate::common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::pki::Pki;
use common::{http_get, run_cli, timed, ServerProcess};
use room_allocator::pb;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tonic::Code;

/// The value of the sample `name{labels}` (labels exactly as rendered).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The sum of every sample of `name` whose labels contain `filter`.
fn sum(text: &str, name: &str, filter: &str) -> f64 {
    text.lines()
        .filter(|line| line.starts_with(&format!("{name}{{")) && line.contains(filter))
        .filter_map(|line| line.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

fn scrape(server: &ServerProcess) -> String {
    http_get(server.metrics_addr, "/metrics")
}

const REGISTER: &str = "grpc_type=\"unary\",grpc_service=\"room_allocator.v1.RoomAllocatorService\",grpc_method=\"RegisterWorker\"";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_and_cancelled_calls_are_counted_and_started_minus_handled_returns_to_zero() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Every store write stalls 2.5 s: past the 1 s request timeout.
    let server =
        ServerProcess::try_start_with(dir.path(), &["--request-timeout-secs", "1"], |command| {
            command.env("FAILPOINTS", "embedded::log_write=sleep(2500)");
        })
        .expect("start");
    let mut client = server.client().await;
    let register = |worker: &str| pb::RegisterWorkerRequest {
        prefill_worker: worker.into(),
        dp_size: 2,
    };
    // The server's deadline fires.
    let timed_out = timed(client.register_worker(register("slow")))
        .await
        .expect_err("past the request timeout");
    assert_ne!(timed_out.code(), Code::Ok, "{timed_out:?}");
    // The client gives up first (no grpc-timeout: a reset stream).
    let mut impatient = server.client().await;
    let gave_up = tokio::time::timeout(
        Duration::from_millis(300),
        impatient.register_worker(register("impatient")),
    )
    .await;
    assert!(gave_up.is_err(), "the call should still be waiting");
    // Let the stalled writes finish; every call has ended by then.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let text = scrape(&server);
    let handled = |code: &str| {
        sample(
            &text,
            &format!("grpc_server_handled_total{{{REGISTER},grpc_code=\"{code}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert_eq!(handled("DeadlineExceeded"), 1.0, "{text}");
    assert_eq!(handled("Canceled"), 1.0, "{text}");
    let started = sum(&text, "grpc_server_started_total", REGISTER);
    let ended = sum(&text, "grpc_server_handled_total", REGISTER);
    assert_eq!(started, ended, "started - handled returns to zero: {text}");
    assert_eq!(
        sum(
            &text,
            "grpc_server_handling_seconds_count",
            &format!("{REGISTER}}}")
        ),
        ended,
        "every handled call is timed: {text}"
    );
    for code in ["DEADLINE_EXCEEDED", "CANCELLED"] {
        assert_eq!(
            sample(
                &text,
                &format!(
                    "room_allocator_requests_total{{method=\"RegisterWorker\",code=\"{code}\"}}"
                )
            ),
            Some(1.0),
            "{code}: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shed_calls_are_counted_in_requests_total() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server =
        ServerProcess::try_start_with(dir.path(), &["--max-concurrent-requests", "1"], |command| {
            command.env("FAILPOINTS", "embedded::log_write=sleep(1000)");
        })
        .expect("start");
    let channel = server.channel().await;
    let calls: Vec<_> = (0..4)
        .map(|n| {
            let mut client =
                pb::room_allocator_service_client::RoomAllocatorServiceClient::new(channel.clone());
            tokio::spawn(async move {
                client
                    .register_worker(pb::RegisterWorkerRequest {
                        prefill_worker: format!("w{n}"),
                        dp_size: 1,
                    })
                    .await
            })
        })
        .collect();
    let mut shed = 0.0;
    for call in calls {
        if let Err(status) = timed(call).await.expect("join") {
            assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
            shed += 1.0;
        }
    }
    assert!(shed >= 1.0, "the limit shed no call");
    let text = scrape(&server);
    assert_eq!(
        sample(
            &text,
            "room_allocator_requests_total{method=\"RegisterWorker\",code=\"RESOURCE_EXHAUSTED\"}"
        ),
        Some(shed),
        "{text}"
    );
}

#[tokio::test]
async fn reload_last_success_stays_0_while_a_rotated_token_is_bad_and_returns_to_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "first\n").expect("write");
    let server = ServerProcess::start(
        &dir.path().join("data"),
        &["--auth-token-file", token.to_str().expect("utf-8")],
    );
    let gauge = |server: &ServerProcess| {
        sample(
            &scrape(server),
            "room_allocator_reload_last_success{file=\"token\"}",
        )
    };
    assert_eq!(gauge(&server), Some(1.0));
    std::fs::write(&token, "").expect("write an empty token");
    let deadline = Instant::now() + Duration::from_secs(10);
    while gauge(&server) != Some(0.0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(gauge(&server), Some(0.0), "the bad file is noticed");
    // Several reload intervals later the failure is still there, and so is 0
    // (the failure counter rose once and an increase-based alert resolved).
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(gauge(&server), Some(0.0), "still failing");
    std::fs::write(&token, "second\n").expect("write");
    let deadline = Instant::now() + Duration::from_secs(10);
    while gauge(&server) != Some(1.0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(gauge(&server), Some(1.0), "fixed");
}

/// A health check whose service name is `size` bytes long.
async fn health_check(addr: SocketAddr, size: usize) -> Result<i32, tonic::Status> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "x".repeat(size),
        })
        .await
        .map(|r| r.into_inner().status)
}

#[tokio::test]
async fn requests_over_64_kib_are_refused_by_health_and_reflection_on_every_port() {
    let dir = tempfile::tempdir().expect("tempdir");
    let health = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let health_addr = health.local_addr().expect("addr");
    drop(health);
    let server = ServerProcess::start(dir.path(), &["--health-listen", &health_addr.to_string()]);
    for addr in [server.grpc_addr, health_addr] {
        let small = timed(health_check(addr, 100)).await;
        assert_eq!(
            small.expect_err("unknown service").code(),
            Code::NotFound,
            "{addr}"
        );
        let large = timed(health_check(addr, 100 * 1024))
            .await
            .expect_err("too large");
        // tonic's code for a message over the limit, as on the allocator service.
        assert_eq!(large.code(), Code::OutOfRange, "{addr}: {large:?}");
    }
    let channel = server.channel().await;
    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(channel);
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: "x".repeat(100 * 1024),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    // tonic's reflection ends the stream on a message it cannot decode:
    // refused means no answer, whether as an error or an empty stream.
    let answered =
        match timed(reflection.server_reflection_info(tokio_stream::iter([request]))).await {
            Err(status) => Err(status),
            Ok(response) => timed(response.into_inner().message()).await,
        };
    assert!(
        !matches!(answered, Ok(Some(_))),
        "a 100 KiB reflection request was answered: {answered:?}"
    );
}

#[test]
fn a_half_sent_request_on_the_metrics_and_health_ports_is_closed_within_10_s() {
    let dir = tempfile::tempdir().expect("tempdir");
    let health = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let health_addr = health.local_addr().expect("addr");
    drop(health);
    let server = ServerProcess::start(dir.path(), &["--health-listen", &health_addr.to_string()]);
    let half_sent: [(SocketAddr, &[u8]); 2] = [
        (server.metrics_addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n"),
        (health_addr, b""),
    ];
    let streams: Vec<_> = half_sent
        .iter()
        .map(|(addr, bytes)| {
            let mut stream = std::net::TcpStream::connect(addr).expect("connect");
            stream.write_all(bytes).expect("send half");
            stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .expect("timeout");
            (addr, stream)
        })
        .collect();
    let started = Instant::now();
    for (addr, mut stream) in streams {
        let mut rest = Vec::new();
        // The server closes (EOF) or resets; a read timeout means it kept it.
        let closed = match stream.read_to_end(&mut rest) {
            Ok(_) => true,
            Err(error) => error.kind() == std::io::ErrorKind::ConnectionReset,
        };
        assert!(closed, "{addr}: still open after {:?}", started.elapsed());
        assert!(
            started.elapsed() < Duration::from_secs(13),
            "{addr}: closed only after {:?}",
            started.elapsed()
        );
    }
    // Complete requests are still served.
    assert!(scrape(&server).contains("room_allocator_ready"));
}

#[test]
fn the_metrics_port_holds_a_bounded_number_of_connections() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = ServerProcess::start(dir.path(), &[]);
    let held: Vec<_> = (0..80)
        .map(|_| std::net::TcpStream::connect(server.metrics_addr).expect("connect"))
        .collect();
    // The ones past the cap are closed at once, well before the header timeout.
    std::thread::sleep(Duration::from_millis(500));
    let mut closed = 0;
    for mut stream in held {
        stream
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("timeout");
        let mut byte = [0u8; 1];
        // Closed: EOF or a reset; held: the read times out.
        match stream.read(&mut byte) {
            Ok(0) => closed += 1,
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => closed += 1,
            _ => {}
        }
    }
    assert!(closed >= 80 - 64, "{closed} of 80 closed");
}

/// A TCP forwarder whose upstream the test switches, as a Service does when
/// a new replica becomes ready: new connections go to the new upstream,
/// existing ones stay where they are.
async fn switchable_proxy(upstream: SocketAddr) -> (SocketAddr, Arc<Mutex<SocketAddr>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let target = Arc::new(Mutex::new(upstream));
    let switch = target.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut client, _)) = listener.accept().await else {
                continue;
            };
            let upstream = *target.lock().expect("lock");
            tokio::spawn(async move {
                if let Ok(mut server) = TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    let _ = server.shutdown().await;
                }
            });
        }
    });
    (addr, switch)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_recycled_so_the_rust_client_reaches_a_new_replica() {
    let dir = tempfile::tempdir().expect("tempdir");
    let age = [
        "--max-connection-age-secs",
        "2",
        "--max-connection-age-grace-secs",
        "1",
    ];
    let old = ServerProcess::start(&dir.path().join("old"), &age);
    let new = ServerProcess::start(&dir.path().join("new"), &age);
    let (proxy, switch) = switchable_proxy(old.grpc_addr).await;
    let client = room_allocator::client::RoomClient::connect(format!("http://{proxy}"))
        .await
        .expect("client");
    client
        .register("spread", 1)
        .await
        .expect("register on the old replica");
    *switch.lock().expect("lock") = new.grpc_addr;
    let reached = |server: &ServerProcess| {
        sum(
            &scrape(server),
            "grpc_server_started_total",
            "grpc_service=\"room_allocator.v1.RoomAllocatorService\"",
        )
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while reached(&new) == 0.0 && Instant::now() < deadline {
        // Calls keep going; where they land is up to the connection.
        let _ = client.register("spread", 1).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        reached(&new) > 0.0,
        "no call reached the new replica in 15 s; old had {}",
        reached(&old)
    );
}

fn with_token(request: &mut tonic::Request<impl Sized>, value: &str) {
    request
        .metadata_mut()
        .insert("authorization", value.parse().expect("ascii"));
}

#[tokio::test]
async fn with_a_token_every_allocator_call_needs_it_by_default_and_health_stays_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").expect("write");
    let token = token.to_str().expect("utf-8");
    let server = ServerProcess::start(&dir.path().join("data"), &["--auth-token-file", token]);
    let mut client = server.client().await;
    let mut register = tonic::Request::new(pb::RegisterWorkerRequest {
        prefill_worker: "w".into(),
        dp_size: 2,
    });
    // The scheme's name in any case (RFC 9110).
    with_token(&mut register, "bearer s3cret");
    timed(client.register_worker(register))
        .await
        .expect("register with the token");
    let allocate = || pb::AllocateRoomRequest {
        prefill_worker: "w".into(),
        dp_rank: 1,
        dp_size: 2,
    };
    let refused = timed(client.allocate_room(allocate()))
        .await
        .expect_err("allocation without the token");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let refused = timed(client.lease_rooms(pb::LeaseRoomsRequest {
        prefill_worker: "w".into(),
        count: 1_000_000,
        dp_size: 2,
    }))
    .await
    .expect_err("a lease without the token");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let refused = timed(client.resolve_rank(pb::ResolveRankRequest { room: 1 }))
        .await
        .expect_err("resolve without the token");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let refused = timed(client.list_workers(pb::ListWorkersRequest::default()))
        .await
        .expect_err("listing without the token");
    assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    let mut allowed = tonic::Request::new(allocate());
    with_token(&mut allowed, "BEARER s3cret");
    let room = timed(client.allocate_room(allowed))
        .await
        .expect("allocation with the token")
        .into_inner()
        .room;
    assert_eq!(room % 2, 1);
    // Health stays open: the kubelet probes it without a token.
    let (code, out, err) = run_cli(&["health", "--server", &server.url()]);
    assert_eq!(code, 0, "{out}{err}");
    // The CLI carries the token.
    let (code, out, err) = run_cli(&[
        "allocate",
        "--server",
        &server.url(),
        "--worker",
        "w",
        "--rank",
        "0",
        "--token",
        "s3cret",
    ]);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn allowing_unauthenticated_allocation_and_requiring_the_token_for_it_are_refused_together() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").expect("write");
    let failure = ServerProcess::try_start(
        &dir.path().join("data"),
        &[
            "--auth-token-file",
            token.to_str().expect("utf-8"),
            "--allow-unauthenticated-allocation",
            "--auth-required-for-allocation",
        ],
    )
    .err()
    .expect("refused");
    assert!(
        failure.log.contains("--allow-unauthenticated-allocation")
            && failure.log.contains("--auth-required-for-allocation"),
        "{}",
        failure.log
    );
}

async fn mtls_allocate(server: &ServerProcess, pki: &Pki) -> Result<u64, tonic::Status> {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pki.read("ca.crt")))
        .domain_name("localhost")
        .identity(Identity::from_pem(
            pki.read("client.crt"),
            pki.read("client.key"),
        ));
    let channel = Channel::from_shared(format!("https://{}", server.grpc_addr))
        .expect("url")
        .timeout(Duration::from_secs(5))
        .tls_config(tls)
        .expect("tls")
        .connect()
        .await
        .map_err(|error| tonic::Status::unavailable(error.to_string()))?;
    pb::room_allocator_service_client::RoomAllocatorServiceClient::new(channel)
        .allocate_room(pb::AllocateRoomRequest {
            prefill_worker: "mtls".into(),
            dp_rank: 0,
            dp_size: 1,
        })
        .await
        .map(|r| r.into_inner().room)
}

#[tokio::test]
async fn tls_client_allowed_names_admit_only_clients_whose_certificate_names_one() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let mut args = pki.server_args(true);
    args.extend([
        "--tls-client-allowed-names".into(),
        "router-1, router-0".into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let allowed = ServerProcess::start(&dir.path().join("a"), &args);
    timed(mtls_allocate(&allowed, &pki))
        .await
        .expect("router-0 is allowed");
    let mut args = pki.server_args(true);
    args.extend(["--tls-client-allowed-names".into(), "router-1".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let other = ServerProcess::start(&dir.path().join("b"), &args);
    let refused = timed(mtls_allocate(&other, &pki))
        .await
        .expect_err("router-0 is not allowed");
    assert_ne!(refused.code(), Code::Ok);
}

#[test]
fn debug_output_of_the_flags_never_shows_a_secret() {
    use clap::Parser;
    let cli = room_allocator::config::Cli::parse_from([
        "room-allocator",
        "serve",
        "--etcd-endpoints",
        "http://127.0.0.1:2379",
        "--etcd-username",
        "root",
        "--etcd-password",
        "pa55word",
    ]);
    assert!(!format!("{cli:?}").contains("pa55word"), "{cli:?}");
    let cli = room_allocator::config::Cli::parse_from([
        "room-allocator",
        "allocate",
        "--worker",
        "w",
        "--rank",
        "0",
        "--token",
        "t0ken",
    ]);
    assert!(!format!("{cli:?}").contains("t0ken"), "{cli:?}");
    let config = room_allocator::store::etcd::client::ConnectOptions {
        user: Some((
            "root".into(),
            room_allocator::secret::Secret::new("pa55word"),
        )),
        identity_pem: Some((b"CERT".to_vec(), b"PRIVATE KEY BYTES".to_vec())),
        ..Default::default()
    };
    let text = format!("{config:?}");
    assert!(
        !text.contains("pa55word") && !text.contains("PRIVATE"),
        "{text}"
    );
}
