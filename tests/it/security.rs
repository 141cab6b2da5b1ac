//! TLS, mutual TLS (with PEM keys as openssl and cert-manager write them),
//! the bearer token, load shedding, and the graceful drain, through the real
//! binary. Certificates are made in the test with rcgen.

use crate::common;

use std::path::Path;
use std::time::Duration;

use common::pki::Pki;
use common::{run_cli, timed, ServerProcess};
use room_allocator::pb;
use room_allocator::pb::room_allocator_service_client::RoomAllocatorServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::Code;

async fn tls_channel(
    server: &ServerProcess,
    pki: &Pki,
    client_cert: bool,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pki.read("ca.crt")))
        .domain_name("localhost");
    if client_cert {
        tls = tls.identity(Identity::from_pem(
            pki.read("client.crt"),
            pki.read("client.key"),
        ));
    }
    Channel::from_shared(format!("https://{}", server.grpc_addr))
        .expect("url")
        .timeout(Duration::from_secs(10))
        .tls_config(tls)?
        .connect()
        .await
}

async fn allocate_on(channel: Channel) -> Result<u64, tonic::Status> {
    RoomAllocatorServiceClient::new(channel)
        .allocate_room(pb::AllocateRoomRequest {
            prefill_worker: "secure".into(),
            dp_rank: 1,
            dp_size: 2,
        })
        .await
        .map(|r| r.into_inner().room)
}

fn start(dir: &Path, args: &[&str]) -> ServerProcess {
    ServerProcess::start(dir, args)
}

#[tokio::test]
async fn tls_serves_tls_clients_and_refuses_plaintext() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(
        dir.path(),
        &[
            "--tls-cert",
            &pki.path("server.crt"),
            "--tls-key",
            &pki.path("server.key"),
        ],
    );
    let channel = timed(tls_channel(&server, &pki, false))
        .await
        .expect("TLS connect");
    let room = timed(allocate_on(channel))
        .await
        .expect("allocate over TLS");
    assert_eq!(room % 2, 1);

    // A plaintext client gets nothing.
    let plaintext = Channel::from_shared(format!("http://{}", server.grpc_addr))
        .expect("url")
        .timeout(Duration::from_secs(5))
        .connect()
        .await;
    if let Ok(channel) = plaintext {
        let refused = timed(allocate_on(channel))
            .await
            .expect_err("plaintext refused");
        assert_ne!(refused.code(), Code::Ok);
    }

    // The CLI's health check verifies the server with the CA.
    let url = format!("https://{}", server.grpc_addr);
    let (code, out, err) = run_cli(&["health", "--server", &url, "--tls-ca", &pki.path("ca.crt")]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("SERVING"), "{out}");
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_and_takes_ec_keys_in_sec1_too() {
    let pki = Pki::new();
    // cert-manager and `openssl ecparam -genkey` write SEC1 "EC PRIVATE KEY".
    let sec1 = std::process::Command::new("openssl")
        .args([
            "ec",
            "-in",
            &pki.path("server.key"),
            "-out",
            &pki.path("server-sec1.key"),
        ])
        .output();
    let key = match sec1 {
        Ok(output) if output.status.success() => {
            let text = String::from_utf8(pki.read("server-sec1.key")).expect("utf-8");
            assert!(text.contains("BEGIN EC PRIVATE KEY"), "{text}");
            pki.path("server-sec1.key")
        }
        _ => {
            assert!(!common::in_ci(), "openssl is needed to convert the key");
            eprintln!("SKIP SEC1: openssl is not installed");
            pki.path("server.key")
        }
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(
        dir.path(),
        &[
            "--tls-cert",
            &pki.path("server.crt"),
            "--tls-key",
            &key,
            "--tls-client-ca",
            &pki.path("ca.crt"),
        ],
    );
    let with_cert = timed(tls_channel(&server, &pki, true))
        .await
        .expect("mTLS connect");
    timed(allocate_on(with_cert))
        .await
        .expect("allocate with a client certificate");
    let without = timed(tls_channel(&server, &pki, false)).await;
    match without {
        Err(_) => {}
        Ok(channel) => {
            let refused = timed(allocate_on(channel))
                .await
                .expect_err("no client certificate");
            assert_ne!(refused.code(), Code::Ok);
        }
    }
}

/// A request carrying `authorization: <token>` if one is given.
fn with_token<T>(message: T, token: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", token.parse().expect("ascii"));
    }
    request
}

#[tokio::test]
async fn the_bearer_token_guards_admin_calls_and_optionally_allocation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "t0ps3cret\n").expect("write");
    let token_path = token_file.to_str().expect("utf-8");
    let data = dir.path().join("data");
    let server = start(
        &data,
        &[
            "--auth-token-file",
            token_path,
            "--allow-unauthenticated-allocation",
        ],
    );
    let url = server.url();

    let register = |token: Option<&'static str>| {
        let url = url.clone();
        async move {
            let mut client = RoomAllocatorServiceClient::connect(url)
                .await
                .expect("connect");
            let request = with_token(
                pb::RegisterWorkerRequest {
                    prefill_worker: "guarded".into(),
                    dp_size: 2,
                },
                token,
            );
            client.register_worker(request).await
        }
    };
    let missing = timed(register(None)).await.expect_err("no token");
    assert_eq!(missing.code(), Code::Unauthenticated);
    assert!(
        missing.message().contains("needs a bearer token"),
        "{missing:?}"
    );
    let wrong = timed(register(Some("Bearer nope")))
        .await
        .expect_err("wrong token");
    assert_eq!(wrong.code(), Code::Unauthenticated);
    timed(register(Some("Bearer t0ps3cret")))
        .await
        .expect("right token");

    // With --allow-unauthenticated-allocation allocation needs no token.
    let mut client = server.client().await;
    timed(client.allocate_room(pb::AllocateRoomRequest {
        prefill_worker: "guarded".into(),
        dp_rank: 0,
        dp_size: 0,
    }))
    .await
    .expect("allocation without a token");
    // Registering through AllocateRoom (a dp_size, a new worker) still
    // needs it: the token is checked once the call would register.
    let allocate_new = |token: Option<&'static str>| {
        let url = url.clone();
        async move {
            let mut client = RoomAllocatorServiceClient::connect(url)
                .await
                .expect("connect");
            let request = with_token(
                pb::AllocateRoomRequest {
                    prefill_worker: "via-allocate".into(),
                    dp_rank: 1,
                    dp_size: 2,
                },
                token,
            );
            client.allocate_room(request).await
        }
    };
    for (token, says) in [(None, "no bearer token"), (Some("Bearer nope"), "is wrong")] {
        let refused = timed(allocate_new(token))
            .await
            .expect_err("not registered");
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
        assert!(refused.message().contains(says), "{token:?}: {refused:?}");
    }
    let room = timed(allocate_new(Some("Bearer t0ps3cret")))
        .await
        .expect("registered through AllocateRoom with the token")
        .into_inner();
    assert_eq!((room.room % 2, room.dp_size), (1, 2));
    // Known now: its rooms need no token.
    timed(allocate_new(None))
        .await
        .expect("a known worker's room without a token");
    let (code, _, err) = run_cli(&[
        "register",
        "--server",
        &url,
        "--worker",
        "cli",
        "--dp-size",
        "1",
        "--token",
        "t0ps3cret",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        !server.log().contains("t0ps3cret"),
        "the token never reaches the log"
    );
    drop(server);

    let strict = start(
        &data,
        &[
            "--auth-token-file",
            token_path,
            "--auth-required-for-allocation",
        ],
    );
    let mut client = strict.client().await;
    let refused = timed(client.allocate_room(pb::AllocateRoomRequest {
        prefill_worker: "guarded".into(),
        dp_rank: 0,
        dp_size: 0,
    }))
    .await
    .expect_err("allocation needs the token now");
    assert_eq!(refused.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_over_the_concurrency_limit_are_shed_with_resource_exhausted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = start(dir.path(), &["--max-concurrent-requests", "1"]);
    let channel = server.channel().await;
    let mut client = RoomAllocatorServiceClient::new(channel.clone());
    timed(client.register_worker(pb::RegisterWorkerRequest {
        prefill_worker: "busy".into(),
        dp_size: 4,
    }))
    .await
    .expect("register");
    // Large leases need a reservation (an fsync) each, so calls overlap.
    let calls: Vec<_> = (0..40)
        .map(|_| {
            let mut client = RoomAllocatorServiceClient::new(channel.clone());
            tokio::spawn(async move {
                client
                    .lease_rooms(pb::LeaseRoomsRequest {
                        prefill_worker: "busy".into(),
                        count: 1_000_000,
                        dp_size: 0,
                    })
                    .await
            })
        })
        .collect();
    let (mut ok, mut shed) = (0, 0);
    for call in calls {
        match timed(call).await.expect("join") {
            Ok(_) => ok += 1,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(
                    status.message().contains("--max-concurrent-requests"),
                    "{status:?}"
                );
                shed += 1;
            }
        }
    }
    assert!(ok >= 1 && shed >= 1, "{ok} served, {shed} shed");
}

#[tokio::test]
async fn sigterm_turns_health_not_serving_keeps_serving_for_the_drain_delay_then_exits_0() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut server = start(dir.path(), &["--drain-delay-secs", "2"]);
    let mut client = server.client().await;
    let url = server.url();
    let pid = i32::try_from(server.pid()).expect("pid");
    // SAFETY: signalling the child this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let mut not_serving = false;
    for _ in 0..100 {
        let (code, out, _) = run_cli(&["health", "--server", &url]);
        if code != 0 && out.contains("NOT_SERVING") {
            not_serving = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(not_serving, "health turned NOT_SERVING");
    timed(client.allocate_room(pb::AllocateRoomRequest {
        prefill_worker: "draining".into(),
        dp_rank: 0,
        dp_size: 1,
    }))
    .await
    .expect("still served during the drain delay");
    let status = tokio::task::spawn_blocking(move || server.terminate())
        .await
        .expect("join");
    assert!(status.success(), "{status:?}");
}
