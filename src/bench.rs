//! `room-allocator bench`: closed-loop load against a server (ours, or the
//! reference ceiling server, which speaks the same contract), or against an
//! etcd compare-and-swap counter for comparison. Every room is checked
//! (unique, rank-aligned), so a fast-but-wrong server cannot score.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use serde_json::json;
use tonic::transport::{Channel, Endpoint};

use crate::pb;
use crate::pb::room_allocator_service_client::RoomAllocatorServiceClient;
use crate::store::etcd::client::{pb as etcd_pb, txn, ConnectOptions, EtcdClient};
use room_allocator_client::RoomClient;

/// Rooms kept for the uniqueness check; past it rooms are counted only, so a
/// run at millions of rooms per second stays within memory.
const MAX_CHECKED_ROOMS: usize = 20_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Method {
    /// One AllocateRoom RPC per room.
    Allocate,
    /// LeaseRooms RPCs of `--lease-count` bases; rooms/s counts bases.
    Lease,
    /// RoomClient::allocate: leased rooms, no RPC on the hot path.
    Client,
    /// A counter in etcd advanced by compare-and-swap (what a router could
    /// build without this service); needs --etcd-endpoints.
    EtcdCas,
    /// RegisterWorker of a new worker, then one AllocateRoom for it: a
    /// start-up storm of registrations (rooms/s counts registrations).
    Register,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// The allocator (or reference server) to load; several, comma-separated,
    /// spread the connections over replicas.
    #[arg(long, default_value = "http://127.0.0.1:50051", value_delimiter = ',')]
    pub server: Vec<String>,
    #[arg(long, value_enum, default_value_t = Method::Allocate)]
    pub method: Method,
    /// Calls in flight at once (closed loop: each caller waits for its answer).
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// HTTP/2 connections the callers share.
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// Seconds to measure, after a one-second warm-up.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Distinct prefill workers the callers spread over.
    #[arg(long, default_value_t = 4)]
    pub workers: u32,
    /// dp_size of every worker.
    #[arg(long, default_value_t = 8)]
    pub dp_size: u32,
    /// Bases per LeaseRooms call (method lease).
    #[arg(long, default_value_t = 1000)]
    pub lease_count: u32,
    /// Stop after this many requests (e.g. to issue a fixed number of rooms).
    #[arg(long)]
    pub requests: Option<u64>,
    /// Tokio worker threads of the load generator.
    #[arg(long, default_value_t = 1)]
    pub worker_threads: usize,
    /// etcd for method etcd-cas.
    #[arg(long, value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
}

/// What one caller saw.
struct CallerResult {
    histogram: Histogram<u64>,
    rooms: Vec<u64>,
    misaligned: u64,
}

struct Shared {
    requests: AtomicU64,
    rooms: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    measuring: AtomicBool,
    stop: AtomicBool,
    checked: AtomicU64,
}

impl Shared {
    fn error(&self, error: impl std::fmt::Display) {
        if self.measuring.load(Ordering::Relaxed) {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let mut first = self.first_error.lock().expect("error lock");
        if first.is_none() {
            *first = Some(error.to_string());
        }
    }
}

fn worker_name(i: u32) -> String {
    format!("bench-worker-{i}")
}

/// Registers the `--workers` workers, 64 at a time over every connection
/// (a store folds concurrent registrations into few writes).
async fn register_all(channels: &[Channel], args: &BenchArgs) -> anyhow::Result<()> {
    let mut pending = tokio::task::JoinSet::new();
    for i in 0..args.workers {
        if pending.len() >= 64 {
            pending
                .join_next()
                .await
                .expect("a task is pending")
                .context("a registration task panicked")??;
        }
        let mut rpc =
            RoomAllocatorServiceClient::new(channels[i as usize % channels.len()].clone());
        let dp_size = args.dp_size;
        pending.spawn(async move {
            rpc.register_worker(pb::RegisterWorkerRequest {
                prefill_worker: worker_name(i),
                dp_size,
            })
            .await
            .map(drop)
            .context("RegisterWorker failed")
        });
    }
    while let Some(done) = pending.join_next().await {
        done.context("a registration task panicked")??;
    }
    Ok(())
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.worker_threads.max(1))
        .enable_all()
        .build()
        .context("cannot start the load generator's runtime")?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: BenchArgs) -> anyhow::Result<()> {
    if args.concurrency == 0 || args.connections == 0 || args.workers == 0 || args.dp_size == 0 {
        bail!("--concurrency, --connections, --workers and --dp-size must be at least 1");
    }
    let mut channels = Vec::new();
    if args.method != Method::EtcdCas {
        for connection in 0..args.connections.max(args.server.len()) {
            let server = &args.server[connection % args.server.len()];
            let channel = Endpoint::from_shared(server.clone())
                .context("--server is not a URL")?
                .tcp_nodelay(true)
                .connect()
                .await
                .with_context(|| format!("cannot connect to --server {server}"))?;
            channels.push(channel);
        }
        if args.method != Method::Register {
            register_all(&channels, &args).await?;
        }
    }
    let room_client =
        (args.method == Method::Client).then(|| RoomClient::from_channel(channels[0].clone()));
    let etcd = match args.method {
        Method::EtcdCas => {
            if args.etcd_endpoints.is_empty() {
                bail!("--method etcd-cas needs --etcd-endpoints");
            }
            let options = ConnectOptions {
                endpoints: args.etcd_endpoints.clone(),
                timeout: Duration::from_secs(5),
                ..ConnectOptions::default()
            };
            Some(
                EtcdClient::connect(&options)
                    .await
                    .context("cannot connect to --etcd-endpoints")?,
            )
        }
        _ => None,
    };
    let cas_key = format!("/room-allocator-bench/counter-{}", std::process::id());

    let shared = Arc::new(Shared {
        requests: AtomicU64::new(0),
        rooms: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        first_error: Mutex::new(None),
        measuring: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        checked: AtomicU64::new(0),
    });
    // Each call takes the next worker in turn, so load spreads over all.
    let names: Arc<Vec<String>> = Arc::new((0..args.workers).map(worker_name).collect());
    let mut callers = Vec::new();
    for caller in 0..args.concurrency {
        let shared = shared.clone();
        let args = args.clone();
        let names = names.clone();
        let rpc = channels
            .get(caller % channels.len().max(1))
            .map(|c| RoomAllocatorServiceClient::new(c.clone()));
        let room_client = room_client.clone();
        let etcd = etcd.clone();
        let cas_key = cas_key.clone();
        callers.push(tokio::spawn(async move {
            caller_loop(caller, args, names, rpc, room_client, etcd, cas_key, shared).await
        }));
    }

    // Warm up, then measure.
    tokio::time::sleep(Duration::from_secs(1)).await;
    shared.requests.store(0, Ordering::Relaxed);
    shared.rooms.store(0, Ordering::Relaxed);
    shared.measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration);
    let mut last = (started, 0u64);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1).min(deadline - Instant::now())).await;
        let now = Instant::now();
        let rooms = shared.rooms.load(Ordering::Relaxed);
        let rate = (rooms - last.1) as f64 / now.duration_since(last.0).as_secs_f64().max(1e-9);
        eprintln!(
            "bench: {:>4.1}s {:>12} rooms {:>12.0} rooms/s {:>6} errors",
            now.duration_since(started).as_secs_f64(),
            rooms,
            rate,
            shared.errors.load(Ordering::Relaxed)
        );
        last = (now, rooms);
        if args
            .requests
            .is_some_and(|limit| shared.requests.load(Ordering::Relaxed) >= limit)
        {
            break;
        }
    }
    shared.measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let requests = shared.requests.load(Ordering::Relaxed);
    let rooms = shared.rooms.load(Ordering::Relaxed);
    shared.stop.store(true, Ordering::Relaxed);

    let mut histogram =
        Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).context("histogram bounds")?;
    let mut all_rooms = Vec::new();
    let mut misaligned = 0;
    for caller in callers {
        let result = caller.await.context("a load task panicked")?;
        histogram
            .add(&result.histogram)
            .context("merging histograms")?;
        misaligned += result.misaligned;
        all_rooms.extend(result.rooms);
    }
    let checked = all_rooms.len();
    all_rooms.sort_unstable();
    let duplicates = all_rooms.windows(2).filter(|w| w[0] == w[1]).count();
    let errors = shared.errors.load(Ordering::Relaxed);
    let secs = elapsed.as_secs_f64();
    let quantile_us = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    let report = json!({
        "method": format!("{:?}", args.method).to_lowercase(),
        "server": args.server.join(","),
        "concurrency": args.concurrency,
        "connections": args.connections,
        "worker_threads": args.worker_threads,
        "duration_secs": secs,
        "requests": requests,
        "rooms": rooms,
        "requests_per_sec": requests as f64 / secs,
        "rooms_per_sec": rooms as f64 / secs,
        "p50_us": quantile_us(0.5),
        "p99_us": quantile_us(0.99),
        "p999_us": quantile_us(0.999),
        "errors": errors,
        "checked_rooms": checked,
        "duplicates": duplicates,
        "misaligned": misaligned,
    });
    println!("{:<14} {:>14}", "requests", requests);
    println!("{:<14} {:>14}", "rooms", rooms);
    println!("{:<14} {:>14.0}", "rooms/s", rooms as f64 / secs);
    println!("{:<14} {:>14.1}", "p50 µs", quantile_us(0.5));
    println!("{:<14} {:>14.1}", "p99 µs", quantile_us(0.99));
    println!("{:<14} {:>14.1}", "p99.9 µs", quantile_us(0.999));
    println!("{:<14} {:>14}", "errors", errors);
    println!("{:<14} {:>14}", "checked rooms", checked);
    println!("{:<14} {:>14}", "duplicates", duplicates);
    println!("{:<14} {:>14}", "misaligned", misaligned);
    println!("{report}");
    if let Some(error) = shared.first_error.lock().expect("error lock").as_ref() {
        eprintln!("bench: first error: {error}");
    }
    if duplicates > 0 || misaligned > 0 {
        bail!("{duplicates} duplicate and {misaligned} misaligned rooms: the server is wrong");
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn caller_loop(
    caller: usize,
    args: BenchArgs,
    names: Arc<Vec<String>>,
    rpc: Option<RoomAllocatorServiceClient<Channel>>,
    room_client: Option<RoomClient>,
    etcd: Option<EtcdClient>,
    cas_key: String,
    shared: Arc<Shared>,
) -> CallerResult {
    let mut result = CallerResult {
        histogram: Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds"),
        rooms: Vec::new(),
        misaligned: 0,
    };
    let check_budget = MAX_CHECKED_ROOMS / args.concurrency.max(1);
    let mut rank = u32::try_from(caller).unwrap_or(0) % args.dp_size;
    let mut calls: u64 = 0;
    while !shared.stop.load(Ordering::Relaxed) {
        if args
            .requests
            .is_some_and(|limit| shared.requests.load(Ordering::Relaxed) >= limit)
        {
            break;
        }
        rank = (rank + 1) % args.dp_size;
        let index = (caller as u64 + calls * args.concurrency as u64) % names.len() as u64;
        let worker = &names[usize::try_from(index).expect("fits")];
        let started = Instant::now();
        let outcome: Result<(u64, u64, u32), String> = match args.method {
            Method::Allocate => rpc
                .clone()
                .expect("a channel")
                .allocate_room(pb::AllocateRoomRequest {
                    prefill_worker: worker.clone(),
                    dp_rank: rank,
                    dp_size: args.dp_size,
                })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    (r.room, 1, r.dp_size)
                })
                .map_err(|s| s.to_string()),
            Method::Lease => rpc
                .clone()
                .expect("a channel")
                .lease_rooms(pb::LeaseRoomsRequest {
                    prefill_worker: worker.clone(),
                    count: args.lease_count,
                    dp_size: args.dp_size,
                })
                .await
                .map(|r| {
                    let r = r.into_inner();
                    // A lease of `count` bases makes `count` rooms for any rank.
                    (
                        r.first_base + u64::from(rank),
                        u64::from(r.count),
                        r.dp_size,
                    )
                })
                .map_err(|s| s.to_string()),
            Method::Client => room_client
                .as_ref()
                .expect("a client")
                .allocate(worker, rank, args.dp_size)
                .await
                .map(|room| (room, 1, args.dp_size))
                .map_err(|e| e.to_string()),
            Method::EtcdCas => cas_increment(etcd.as_ref().expect("etcd"), &cas_key)
                .await
                .map(|value| (value, 1, 1)),
            Method::Register => {
                register_and_allocate(rpc.clone().expect("a channel"), caller, calls, &args).await
            }
        };
        let elapsed = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        match outcome {
            Ok((room, count, dp_size)) => {
                if shared.measuring.load(Ordering::Relaxed) {
                    shared.requests.fetch_add(1, Ordering::Relaxed);
                    shared.rooms.fetch_add(count, Ordering::Relaxed);
                    let _ = result.histogram.record(elapsed.max(1));
                }
                let expected_rank = match args.method {
                    Method::EtcdCas | Method::Register => 0,
                    _ => rank,
                };
                if dp_size == 0
                    || room % u64::from(dp_size) != u64::from(expected_rank % dp_size.max(1))
                {
                    result.misaligned += 1;
                }
                if result.rooms.len() < check_budget {
                    if args.method == Method::Lease {
                        // Every base of the block, as rooms of this rank.
                        let first = room - u64::from(rank);
                        for i in 0..count.min((check_budget - result.rooms.len()) as u64) {
                            result
                                .rooms
                                .push(first + i * u64::from(dp_size) + u64::from(rank));
                        }
                    } else {
                        result.rooms.push(room);
                    }
                }
            }
            Err(error) => {
                shared.error(error);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        calls += 1;
        // Let the progress task run on a single-threaded load generator.
        if args.method == Method::Client && calls.is_multiple_of(4096) {
            tokio::task::yield_now().await;
        }
    }
    shared
        .checked
        .fetch_add(result.rooms.len() as u64, Ordering::Relaxed);
    result
}

/// Registers a new worker (named after the caller and call, and this
/// process, so runs never collide) and allocates one room for it, rank 0.
async fn register_and_allocate(
    mut rpc: RoomAllocatorServiceClient<Channel>,
    caller: usize,
    call: u64,
    args: &BenchArgs,
) -> Result<(u64, u64, u32), String> {
    let worker = format!("bench-{}-{caller}-{call}", std::process::id());
    rpc.register_worker(pb::RegisterWorkerRequest {
        prefill_worker: worker.clone(),
        dp_size: args.dp_size,
    })
    .await
    .map_err(|s| s.to_string())?;
    let room = rpc
        .allocate_room(pb::AllocateRoomRequest {
            prefill_worker: worker,
            dp_rank: 0,
            dp_size: args.dp_size,
        })
        .await
        .map_err(|s| s.to_string())?
        .into_inner();
    Ok((room.room, 1, room.dp_size))
}

/// Advances a counter in etcd by compare-and-swap; retries lost races.
async fn cas_increment(etcd: &EtcdClient, key: &str) -> Result<u64, String> {
    loop {
        let current = etcd
            .range(etcd_pb::RangeRequest {
                key: key.as_bytes().to_vec(),
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        let (value, guard) = crate::store::etcd::counter_guard(current.kvs.first(), key)
            .ok_or_else(|| format!("{key} is not a number"))?;
        let next = value + 1;
        let request = etcd_pb::TxnRequest {
            compare: vec![guard],
            success: vec![txn::put(key, next.to_string(), 0)],
            failure: Vec::new(),
        };
        if etcd
            .txn(request)
            .await
            .map_err(|e| e.to_string())?
            .succeeded
        {
            return Ok(next);
        }
    }
}
