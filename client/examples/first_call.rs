//! What a router's first room costs, and every room after: times
//! `connect`, the first `allocate` of a new client (one LeaseRooms), the
//! first `allocate` after `warm_up`, and leased `allocate` in a loop.
//! BENCHMARKS.md quotes it.
//!
//! `cargo run --release -p room-allocator-client --example first_call -- http://127.0.0.1:50051`

use std::time::{Duration, Instant};

use room_allocator_client::RoomClient;

/// New clients timed; the medians are reported.
const CLIENTS: usize = 20;
/// Leased rooms timed for the steady state.
const ROOMS: u32 = 1_000_000;
const WORKER: &str = "first-call-bench";
const DP_SIZE: u32 = 8;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::args()
        .nth(1)
        .ok_or("usage: first_call http://HOST:PORT")?;
    RoomClient::connect(&url)
        .await?
        .register(WORKER, DP_SIZE)
        .await?;
    let (mut connect, mut cold, mut warm) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..CLIENTS {
        let started = Instant::now();
        let client = RoomClient::connect(&url).await?;
        connect.push(started.elapsed());
        let started = Instant::now();
        client.allocate(WORKER, 3, DP_SIZE).await?;
        cold.push(started.elapsed());

        let client = RoomClient::connect(&url).await?;
        client.warm_up(&[(WORKER, DP_SIZE)]).await?;
        let started = Instant::now();
        client.allocate(WORKER, 3, DP_SIZE).await?;
        warm.push(started.elapsed());
    }
    let client = RoomClient::connect(&url).await?;
    client.warm_up(&[(WORKER, DP_SIZE)]).await?;
    let started = Instant::now();
    for i in 0..ROOMS {
        client.allocate(WORKER, i % DP_SIZE, DP_SIZE).await?;
    }
    let steady = started.elapsed() / ROOMS;
    println!(
        "connect {:?}; first allocate after connect {:?}; first allocate after warm_up {:?} (medians of {CLIENTS}); steady allocate {steady:?} a room ({ROOMS} rooms)",
        median(connect),
        median(cold),
        median(warm)
    );
    Ok(())
}
