//! The in-memory hot paths against a bare `AtomicU64::fetch_add`, measured in
//! the same run: AllocateRoom's path inside the allocator (a room from the
//! current range, no RPC, no disk), and `RoomClient::try_allocate` (a room
//! from a leased block, worker lookup included).
//!
//! The `per_call` group attributes what one AllocateRoom costs in this
//! process, step by step, each step including the ones below it: the
//! allocator; the service's glue (`Service::allocate_room`: token check,
//! metrics, log, response); tonic's codec (`RoomAllocatorServiceServer` on an
//! encoded request, response body collected); the gRPC port's tower layers
//! (gRPC metrics and in-flight limit) around all that. The difference
//! between two steps is the cost of one. Not included: HTTP/2, the socket,
//! tonic's routing and its own layers (the ceiling server pays them too).
//! `metric_lookups_by_label` is what the metrics of one call cost when each
//! series is looked up by its labels (five lookups a call, as before
//! 2026-12-07), `metric_series_resolved` the same five updates through
//! series resolved once (as now).
//!
//! `cargo bench --bench hot_path`

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use http_body_util::BodyExt as _;
use hyper::body::Bytes;
use prost::Message as _;
use room_allocator::allocator::{Allocator, Registrar};
use room_allocator::client::RoomClient;
use room_allocator::config::Cli;
use room_allocator::metrics::{ByCode, Counter, Histogram, Method, Metrics, Series, SERVICE};
use room_allocator::pb;
use room_allocator::pb::room_allocator_service_server::RoomAllocatorService as _;
use room_allocator::server::{with_grpc_layers, Server};
use room_allocator::service::{RoomAllocatorServiceServer, Service};

fn serve_args(dir: &std::path::Path) -> room_allocator::config::ServeArgs {
    use clap::Parser;
    let cli = Cli::parse_from([
        "room-allocator",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--data-dir",
        dir.to_str().expect("utf-8 temp dir"),
    ]);
    match cli.command {
        room_allocator::config::Command::Serve(args) => *args,
        _ => unreachable!("parsed a serve command"),
    }
}

fn hot_path(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut group = c.benchmark_group("hot_path");
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));

    let counter = AtomicU64::new(0);
    group.bench_function("bare_atomic_fetch_add", |b| {
        b.iter(|| black_box(counter.fetch_add(8, Ordering::Relaxed)))
    });

    let server = runtime
        .block_on(Server::open(
            &serve_args(dir.path())
                .server_config()
                .expect("a valid configuration"),
        ))
        .expect("open the store");
    let allocator = server.allocator().clone();
    runtime
        .block_on(allocator.register("bench-worker", 8))
        .expect("register");
    bench_allocator_allocate(&mut group, &runtime, &allocator);

    // The client leases from a real server running in this process.
    let (grpc, metrics) = runtime.block_on(async {
        (
            tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind"),
            tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind"),
        )
    });
    let url = format!("http://{}", grpc.local_addr().expect("addr"));
    runtime.spawn(server.serve(grpc, metrics, None, std::future::pending()));
    let client = runtime
        .block_on(RoomClient::connect(&url))
        .expect("connect");
    runtime
        .block_on(client.allocate("bench-worker", 0, 8))
        .expect("first lease");
    group.bench_function("client_try_allocate", |b| {
        b.iter(|| {
            let room = match client.try_allocate("bench-worker", 5, 8) {
                Some(room) => room,
                // The refill did not keep up: take the slow path.
                None => runtime
                    .block_on(client.allocate("bench-worker", 5, 8))
                    .expect("room"),
            };
            black_box(room)
        })
    });
    group.finish();
}

fn bench_allocator_allocate(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    runtime: &tokio::runtime::Runtime,
    allocator: &Allocator,
) {
    group.bench_function("allocator_allocate", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    black_box(
                        allocator
                            .allocate("bench-worker", 3, 0, Registrar::Allowed)
                            .await
                            .expect("room"),
                    );
                }
                started.elapsed()
            })
        })
    });
}

/// An encoded AllocateRoom call, as tonic receives it from HTTP/2.
fn allocate_room_request() -> http::Request<tonic::body::Body> {
    let message = pb::AllocateRoomRequest {
        prefill_worker: "bench-worker".into(),
        dp_rank: 3,
        dp_size: 0,
    }
    .encode_to_vec();
    // The gRPC frame: not compressed, the length, the message.
    let mut frame = vec![0];
    frame.extend_from_slice(
        &u32::try_from(message.len())
            .expect("a small message")
            .to_be_bytes(),
    );
    frame.extend_from_slice(&message);
    http::Request::builder()
        .method("POST")
        .uri(format!("/{SERVICE}/AllocateRoom"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(http_body_util::Full::new(
            Bytes::from(frame),
        )))
        .expect("a valid request")
}

/// Calls `service` `iters` times with an AllocateRoom request and reads each
/// response to its end (tonic encodes the message as the body is read).
fn run_calls<S>(runtime: &tokio::runtime::Runtime, service: &mut S, iters: u64) -> Duration
where
    S: tower::Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<tonic::body::Body>,
    >,
    S::Error: std::fmt::Debug,
{
    runtime.block_on(async {
        let started = Instant::now();
        for _ in 0..iters {
            std::future::poll_fn(|cx| service.poll_ready(cx))
                .await
                .expect("ready");
            let response = service
                .call(allocate_room_request())
                .await
                .expect("a response");
            let body = response.into_body().collect().await.expect("a body");
            black_box(body);
        }
        started.elapsed()
    })
}

/// One AllocateRoom, step by step (see the file's header).
fn per_call(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut group = c.benchmark_group("per_call");
    group.measurement_time(Duration::from_secs(3));
    group.warm_up_time(Duration::from_secs(1));

    let counter = AtomicU64::new(0);
    group.bench_function("bare_atomic_fetch_add", |b| {
        b.iter(|| black_box(counter.fetch_add(8, Ordering::Relaxed)))
    });

    let server = runtime
        .block_on(Server::open(
            &serve_args(dir.path())
                .server_config()
                .expect("a valid configuration"),
        ))
        .expect("open the store");
    let allocator = server.allocator().clone();
    runtime
        .block_on(allocator.register("bench-worker", 8))
        .expect("register");
    bench_allocator_allocate(&mut group, &runtime, &allocator);

    let metrics = Arc::new(Metrics::new("embedded"));
    let service = Service::new(allocator.clone(), metrics.clone(), None);
    group.bench_function("service_allocate_room", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let started = Instant::now();
                for _ in 0..iters {
                    let request = tonic::Request::new(pb::AllocateRoomRequest {
                        prefill_worker: "bench-worker".into(),
                        dp_rank: 3,
                        dp_size: 0,
                    });
                    black_box(service.allocate_room(request).await.expect("room"));
                }
                started.elapsed()
            })
        })
    });

    let mut codec =
        RoomAllocatorServiceServer::new(Service::new(allocator.clone(), metrics.clone(), None));
    group.bench_function("tonic_allocate_room", |b| {
        b.iter_custom(|iters| run_calls(&runtime, &mut codec, iters))
    });

    let mut layered = with_grpc_layers(
        RoomAllocatorServiceServer::new(Service::new(allocator, metrics.clone(), None)),
        metrics.clone(),
        Duration::from_secs(10),
        10_000,
    );
    group.bench_function("layered_allocate_room", |b| {
        b.iter_custom(|iters| run_calls(&runtime, &mut layered, iters))
    });

    // The lookups one call made when every series was found by its labels:
    // started, handling time, handled; the service's count and time.
    let grpc_labels = ["unary", SERVICE, "AllocateRoom"];
    group.bench_function("metric_lookups_by_label", |b| {
        b.iter(|| {
            let elapsed = Duration::from_micros(40);
            metrics.grpc_started.get(&grpc_labels).inc();
            metrics.grpc_handling.get(&grpc_labels).observe(elapsed);
            metrics
                .grpc_handled
                .get(&["unary", SERVICE, "AllocateRoom", "OK"])
                .inc();
            metrics.requests.get(&["AllocateRoom", "OK"]).inc();
            metrics
                .request_duration
                .get(&["AllocateRoom", "OK"])
                .observe(elapsed);
        })
    });
    // The same updates through series resolved once, as a call makes them now.
    let (started, handling) = (Series::<Counter>::default(), Series::<Histogram>::default());
    let handled = ByCode::<Counter>::default();
    group.bench_function("metric_series_resolved", |b| {
        b.iter(|| {
            let elapsed = Duration::from_micros(40);
            started.get(&metrics.grpc_started, &grpc_labels).inc();
            handling
                .get(&metrics.grpc_handling, &grpc_labels)
                .observe(elapsed);
            handled
                .of(tonic::Code::Ok)
                .get(
                    &metrics.grpc_handled,
                    &["unary", SERVICE, "AllocateRoom", "OK"],
                )
                .inc();
            metrics.observe_request(Method::AllocateRoom, tonic::Code::Ok, elapsed);
        })
    });
    group.finish();
}

criterion_group!(benches, hot_path, per_call);
criterion_main!(benches);
