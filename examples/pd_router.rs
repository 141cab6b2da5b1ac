//! A toy prefill/decode router on `RoomClient`. For each request it picks a
//! prefill rank, takes a room for it with no RPC on the hot path, and sends
//! both halves of the request with `bootstrap_room = room`: the prefill half
//! to that rank, the decode half to a decode server, which recovers the rank
//! as SGLang does, `room % prefill_dp_size`.
//!
//! Midway an operator (another client) realigns the prefill worker to a new
//! dp_size, as when it restarts with more data-parallel ranks. The router
//! learns it as `Error::DpSizeMismatch { registered, .. }` (at its next lease
//! refill, or when its lease ages out), adopts the registered size, and goes
//! on; no room it hands out is misaligned for the size it believes.
//!
//! Run a server (`cargo run --release -- serve`), then:
//! `cargo run --example pd_router -- http://127.0.0.1:50051 [--token-file FILE]`
//! (`--token-file` for a server run with `--auth-token-file`).

use std::collections::HashSet;
use std::process::ExitCode;
use std::time::Duration;

use room_allocator::client::{Error, RoomClient};

const PREFILL_WORKER: &str = "prefill-0.example:8998";
const PREFILL_DP_SIZE: u32 = 4;
/// The size the operator realigns the worker to midway.
const NEW_PREFILL_DP_SIZE: u32 = 8;
const REQUESTS: u32 = 12;
/// Requests at most after the realignment before the router must have
/// learned it: a lease's worth and then some.
const MAX_STALE_REQUESTS: u32 = 100_000;

/// What the decode server does with a request's bootstrap room: pull the KV
/// cache from this prefill rank.
fn decode_side(bootstrap_room: u64, prefill_dp_size: u32) -> u64 {
    bootstrap_room % u64::from(prefill_dp_size)
}

struct Args {
    url: String,
    token: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut url = None;
    let mut token = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--token-file" => {
                let path = args.next().ok_or("--token-file needs a file")?;
                let text = std::fs::read_to_string(&path)
                    .map_err(|error| format!("cannot read --token-file {path}: {error}"))?;
                token = Some(text.trim().to_owned());
            }
            flag if flag.starts_with("--") => return Err(format!("unknown flag {flag}")),
            _ if url.is_none() => url = Some(arg),
            _ => return Err(format!("unexpected argument {arg:?}")),
        }
    }
    Ok(Args {
        url: url.unwrap_or_else(|| "http://127.0.0.1:50051".to_owned()),
        token,
    })
}

async fn connect(args: &Args) -> Result<RoomClient, Error> {
    let mut builder = RoomClient::builder([&args.url]).timeout(Duration::from_secs(5));
    if let Some(token) = &args.token {
        builder = builder.bearer_token(token.clone());
    }
    builder.connect().await
}

async fn run(args: Args) -> Result<(), Error> {
    let router = connect(&args).await?;
    // Registering is an admin call when the server has a token.
    router.register(PREFILL_WORKER, PREFILL_DP_SIZE).await?;
    // The router's view of the prefill worker.
    let mut prefill_dp_size = PREFILL_DP_SIZE;

    let mut rooms = HashSet::new();
    for request in 0..REQUESTS {
        // The router balances prefill ranks; here, round robin.
        let prefill_rank = request % prefill_dp_size;
        let room = router
            .allocate(PREFILL_WORKER, prefill_rank, prefill_dp_size)
            .await?;
        assert!(rooms.insert(room), "a room is never reused");
        // Prefill half: to rank `prefill_rank` of the prefill worker.
        // Decode half: the decode server finds the prefill rank from the room.
        let pulls_from = decode_side(room, prefill_dp_size);
        assert_eq!(pulls_from, u64::from(prefill_rank));
        println!(
            "request {request:2}: prefill rank {prefill_rank} -> bootstrap_room {room} -> decode pulls from prefill rank {pulls_from}"
        );
    }
    let resolved = router
        .resolve(*rooms.iter().next().expect("a room"))
        .await?;
    println!(
        "ResolveRank: worker {} rank {} dp_size {}",
        resolved.prefill_worker, resolved.dp_rank, resolved.dp_size
    );

    // An operator (another client, another process in real life) restarts
    // the prefill worker with more ranks and realigns it.
    let operator = connect(&args).await?;
    operator
        .register(PREFILL_WORKER, NEW_PREFILL_DP_SIZE)
        .await?;
    println!("operator: {PREFILL_WORKER} realigned to dp_size {NEW_PREFILL_DP_SIZE}");

    // The router goes on with its old view until the allocator tells it.
    let mut request = REQUESTS;
    let mut stale = 0;
    loop {
        let prefill_rank = request % prefill_dp_size;
        match router
            .allocate(PREFILL_WORKER, prefill_rank, prefill_dp_size)
            .await
        {
            Ok(room) => {
                // Still from a lease taken before the realignment: aligned
                // to the size it was issued under, and never reused.
                assert_eq!(decode_side(room, prefill_dp_size), u64::from(prefill_rank));
                assert!(rooms.insert(room), "a room is never reused");
                request += 1;
                stale += 1;
                assert!(stale < MAX_STALE_REQUESTS, "the realignment never arrived");
            }
            Err(Error::DpSizeMismatch { registered, .. }) => {
                println!(
                    "router: {PREFILL_WORKER} is registered with dp_size {registered}, not {prefill_dp_size}; adopting it ({stale} requests served from the old lease meanwhile)"
                );
                prefill_dp_size = registered;
                break;
            }
            Err(other) => return Err(other),
        }
    }
    for _ in 0..prefill_dp_size {
        let prefill_rank = request % prefill_dp_size;
        let room = router
            .allocate(PREFILL_WORKER, prefill_rank, prefill_dp_size)
            .await?;
        assert!(rooms.insert(room), "a room is never reused");
        let pulls_from = decode_side(room, prefill_dp_size);
        assert_eq!(pulls_from, u64::from(prefill_rank));
        let resolved = router.resolve(room).await?;
        assert_eq!(
            (resolved.dp_rank, resolved.dp_size),
            (prefill_rank, prefill_dp_size)
        );
        println!(
            "request {request:2}: prefill rank {prefill_rank} -> bootstrap_room {room} -> decode pulls from prefill rank {pulls_from} (dp_size {prefill_dp_size})"
        );
        request += 1;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            eprintln!("pd_router: {message}\nusage: pd_router [URL] [--token-file FILE]");
            return ExitCode::from(2);
        }
    };
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("pd_router: {error}");
            ExitCode::FAILURE
        }
    }
}
