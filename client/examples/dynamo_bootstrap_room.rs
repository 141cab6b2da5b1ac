//! The bootstrap room at NVIDIA Dynamo's call site, from the allocator.
//!
//! Dynamo's prefill router (`resolve_prefill_worker` under
//! `lib/llm/src/kv_router/prefill_router/` in ai-dynamo/dynamo) picks a
//! prefill worker and maybe a DP rank (`Option<u32>`), looks up the worker's
//! bootstrap host and port and its data-parallel size (`Option<u32>`, from
//! its model manager), draws `r` uniformly from `0..=i64::MAX`, and calls
//! `compute_bootstrap_room(dp_rank, dp_size, r)`, which aligns `r` to the
//! rank (`room % dp_size == dp_rank`, `room <= i64::MAX`) and returns `r`
//! unchanged when the rank or the size is unknown. The drop-in below keeps that signature's inputs and
//! Dynamo's own function as the fallback, so nothing gets worse:
//!
//! - rank and size known, allocator up: an allocator room (unique across
//!   router processes and restarts, resolvable with ResolveRank), with no
//!   RPC on the hot path once a lease is held;
//! - rank or size unknown (a worker that does not report its dp_size, a
//!   simple router that picks no rank): Dynamo's room, as today;
//! - allocator down or slow past [`ALLOCATION_DEADLINE`]: Dynamo's aligned
//!   random room. It can equal a room the allocator issued, with odds of
//!   about (rooms issued) / (2^63 / dp_size) each; a server run with
//!   `--max-room` below 2^62 and a client built with `outage_fallback` from
//!   2^62 removes even that (see the crate docs).
//!
//! The allocator's name for the worker is SGLang's bootstrap address
//! `host:port`, the name decode and ResolveRank use too.
//!
//! Run a server (`cargo run --release -- serve`), then
//! `cargo run -p room-allocator-client --example dynamo_bootstrap_room --
//! http://127.0.0.1:50051`; each line shows a room, the rank it encodes and
//! where it came from. With no server the rooms are Dynamo's own.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::process::ExitCode;
use std::time::Duration;

use room_allocator_client::limits::MAX_ROOM;
use room_allocator_client::RoomClient;

/// Longest the router waits for an allocator room when its lease is empty
/// before it makes Dynamo's own room: a request must not stall on the
/// allocator.
const ALLOCATION_DEADLINE: Duration = Duration::from_millis(50);
/// The prefill worker of the demo: its bootstrap host and port.
const BOOTSTRAP_HOST: &str = "prefill-0.example";
const BOOTSTRAP_PORT: u16 = 8998;
const DP_SIZE: u32 = 4;

/// What Dynamo's `compute_bootstrap_room` computes: with a rank and a
/// non-zero size, one of the numbers `rank, rank + size, ..` up to
/// `i64::MAX`, chosen by `r`; else `r` itself (`r <= i64::MAX`).
fn compute_bootstrap_room(dp_rank: Option<u32>, dp_size: Option<u32>, r: u64) -> u64 {
    let (Some(rank), Some(size)) = (dp_rank, dp_size.filter(|&size| size > 0)) else {
        return r;
    };
    let (rank, size) = (u64::from(rank), u64::from(size));
    let aligned_numbers = (MAX_ROOM - rank) / size + 1;
    rank + (r % aligned_numbers) * size
}

/// Where a room came from, for the demo's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Allocator,
    Dynamo,
}

/// The drop-in for `compute_bootstrap_room(dp_rank, dp_size, r)`: the same
/// inputs, plus the allocator client (`None` when none is configured) and
/// the worker's bootstrap address.
async fn bootstrap_room(
    allocator: Option<&RoomClient>,
    bootstrap_host: &str,
    bootstrap_port: u16,
    dp_rank: Option<u32>,
    dp_size: Option<u32>,
    r: u64,
) -> (u64, Source) {
    let (Some(client), Some(rank), Some(size)) = (allocator, dp_rank, dp_size) else {
        return (compute_bootstrap_room(dp_rank, dp_size, r), Source::Dynamo);
    };
    let worker = if bootstrap_host.contains(':') {
        format!("[{bootstrap_host}]:{bootstrap_port}")
    } else {
        format!("{bootstrap_host}:{bootstrap_port}")
    };
    match tokio::time::timeout(ALLOCATION_DEADLINE, client.allocate(&worker, rank, size)).await {
        Ok(Ok(room)) => (room, Source::Allocator),
        Ok(Err(error)) => {
            eprintln!("allocator: {error}; using Dynamo's own room");
            (compute_bootstrap_room(dp_rank, dp_size, r), Source::Dynamo)
        }
        Err(_elapsed) => (compute_bootstrap_room(dp_rank, dp_size, r), Source::Dynamo),
    }
}

/// Dynamo's `rand::random_range(0..=i64::MAX)`, without the rand crate:
/// std's randomly keyed SipHash of a counter, top bit dropped.
struct RandomRooms {
    keys: RandomState,
    counter: u64,
}

impl RandomRooms {
    fn next(&mut self) -> u64 {
        self.counter += 1;
        self.keys.hash_one(self.counter) >> 1
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let url = std::env::args().nth(1);
    let allocator = match &url {
        Some(url) => match RoomClient::builder([url.as_str()])
            .connect_patience(Duration::from_secs(2))
            .connect()
            .await
        {
            Ok(client) => Some(client),
            Err(error) => {
                eprintln!("no allocator ({error}); every room is Dynamo's own");
                None
            }
        },
        None => None,
    };
    let worker = format!("{BOOTSTRAP_HOST}:{BOOTSTRAP_PORT}");
    if let Some(client) = &allocator {
        // Workers register when they join (an admin act); here the demo does.
        if let Err(error) = client.register(&worker, DP_SIZE).await {
            eprintln!("cannot register {worker}: {error}");
            return ExitCode::FAILURE;
        }
        if let Err(error) = client.warm_up(&[(worker.as_str(), DP_SIZE)]).await {
            eprintln!("warm-up failed: {error}");
        }
    }
    let mut random = RandomRooms {
        keys: RandomState::new(),
        counter: 0,
    };
    // Requests as Dynamo's router makes them: a rank per request, and some
    // from a worker whose dp_size is unknown.
    for request in 0..8u32 {
        let dp_rank = Some(request % DP_SIZE);
        let dp_size = (request % 4 != 3).then_some(DP_SIZE);
        let (room, source) = bootstrap_room(
            allocator.as_ref(),
            BOOTSTRAP_HOST,
            BOOTSTRAP_PORT,
            dp_rank,
            dp_size,
            random.next(),
        )
        .await;
        if let (Some(rank), Some(size)) = (dp_rank, dp_size) {
            if room % u64::from(size) != u64::from(rank) {
                eprintln!("room {room} is not aligned to rank {rank} of {size}");
                return ExitCode::FAILURE;
            }
        }
        let rank = dp_size.map_or("unknown".to_owned(), |size| {
            (room % u64::from(size)).to_string()
        });
        println!("room {room} rank {rank} source {source:?}");
    }
    ExitCode::SUCCESS
}
