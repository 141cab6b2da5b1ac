//! The in-memory hot paths against a bare `AtomicU64::fetch_add`, measured in
//! the same run: AllocateRoom's path inside the allocator (a room from the
//! current range, no RPC, no disk), and `RoomClient::try_allocate` (a room
//! from a leased block, worker lookup included).
//!
//! `cargo bench --bench hot_path`

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use room_allocator::allocator::Registrar;
use room_allocator::client::RoomClient;
use room_allocator::config::Cli;
use room_allocator::server::Server;

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

criterion_group!(benches, hot_path);
criterion_main!(benches);
