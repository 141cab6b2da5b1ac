//! The reference server for benchmarks: the room-allocator contract served by
//! tonic with nothing but an in-memory `AtomicU64` per worker. No durability,
//! no ranges, no metrics: the physical ceiling of a gRPC allocator on this
//! machine. Our server's rooms/s divided by this one's, at the same
//! concurrency and runtime settings, is our overhead.
//!
//! `cargo run --release --example ceiling_server -- --listen 127.0.0.1:50061 --worker-threads 1`

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use clap::Parser;
use room_allocator::pb;
use room_allocator::pb::room_allocator_service_server::{
    RoomAllocatorService, RoomAllocatorServiceServer,
};
use tonic::{Request, Response, Status};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:50061")]
    listen: std::net::SocketAddr,
    #[arg(long, default_value_t = 1)]
    worker_threads: usize,
}

struct Worker {
    dp_size: u32,
    /// Bases handed out so far; each worker owns its own 2^40-number slice
    /// of the space, so rooms are unique across workers too.
    next: AtomicU64,
    slice_start: u64,
}

#[derive(Default)]
struct Ceiling {
    workers: RwLock<HashMap<String, Arc<Worker>>>,
}

const SLICE: u64 = 1 << 40;

impl Ceiling {
    fn worker(&self, name: &str) -> Result<Arc<Worker>, Status> {
        self.workers
            .read()
            .expect("lock")
            .get(name)
            .cloned()
            .ok_or_else(|| Status::not_found("unknown worker"))
    }
}

#[tonic::async_trait]
impl RoomAllocatorService for Ceiling {
    async fn register_worker(
        &self,
        request: Request<pb::RegisterWorkerRequest>,
    ) -> Result<Response<pb::RegisterWorkerResponse>, Status> {
        let request = request.into_inner();
        let mut workers = self.workers.write().expect("lock");
        let slice_start = (workers.len() as u64 + 1) * SLICE;
        workers
            .entry(request.prefill_worker.clone())
            .or_insert_with(|| {
                Arc::new(Worker {
                    dp_size: request.dp_size.max(1),
                    next: AtomicU64::new(0),
                    slice_start,
                })
            });
        Ok(Response::new(pb::RegisterWorkerResponse {
            worker: Some(pb::WorkerInfo {
                prefill_worker: request.prefill_worker,
                dp_size: request.dp_size,
                rooms_issued: 0,
            }),
        }))
    }

    async fn allocate_room(
        &self,
        request: Request<pb::AllocateRoomRequest>,
    ) -> Result<Response<pb::AllocateRoomResponse>, Status> {
        let request = request.into_inner();
        let worker = self.worker(&request.prefill_worker)?;
        let n = worker.next.fetch_add(1, Ordering::Relaxed);
        let base = worker.slice_start + n * u64::from(worker.dp_size);
        Ok(Response::new(pb::AllocateRoomResponse {
            room: base + u64::from(request.dp_rank),
            dp_size: worker.dp_size,
        }))
    }

    async fn lease_rooms(
        &self,
        request: Request<pb::LeaseRoomsRequest>,
    ) -> Result<Response<pb::LeaseRoomsResponse>, Status> {
        let request = request.into_inner();
        let worker = self.worker(&request.prefill_worker)?;
        let n = worker
            .next
            .fetch_add(u64::from(request.count), Ordering::Relaxed);
        Ok(Response::new(pb::LeaseRoomsResponse {
            first_base: worker.slice_start + n * u64::from(worker.dp_size),
            count: request.count,
            dp_size: worker.dp_size,
            valid_for_ms: 3_600_000,
        }))
    }

    async fn resolve_rank(
        &self,
        _request: Request<pb::ResolveRankRequest>,
    ) -> Result<Response<pb::ResolveRankResponse>, Status> {
        Err(Status::unimplemented("the ceiling server only allocates"))
    }

    async fn list_workers(
        &self,
        _request: Request<pb::ListWorkersRequest>,
    ) -> Result<Response<pb::ListWorkersResponse>, Status> {
        Ok(Response::new(pb::ListWorkersResponse::default()))
    }

    async fn deregister_worker(
        &self,
        _request: Request<pb::DeregisterWorkerRequest>,
    ) -> Result<Response<pb::DeregisterWorkerResponse>, Status> {
        Err(Status::unimplemented("the ceiling server only allocates"))
    }

    async fn get_room_space(
        &self,
        _request: Request<pb::GetRoomSpaceRequest>,
    ) -> Result<Response<pb::RoomSpace>, Status> {
        // Slices are carved from anywhere in the space: claim all of it, so
        // no client takes a fallback region from here.
        Ok(Response::new(pb::RoomSpace {
            min_room: 1,
            max_room: room_allocator::client::limits::MAX_ROOM,
        }))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.worker_threads.max(1))
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = tokio::net::TcpListener::bind(args.listen).await?;
            eprintln!(
                "ceiling server listening grpc_addr={}",
                listener.local_addr()?
            );
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            tonic::transport::Server::builder()
                .add_service(RoomAllocatorServiceServer::new(Ceiling::default()))
                .serve_with_incoming(incoming)
                .await?;
            Ok(())
        })
}
