//! The client subcommands: one JSON object per line on standard output, and
//! on failure the status code name and message on standard error.

use std::time::Duration;

use serde_json::json;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};
use tonic_health::pb::health_client::HealthClient;

use crate::config::{AllocateArgs, ClientArgs, HealthArgs, RegisterArgs, ResolveArgs};
use crate::pb;
use crate::pb::room_allocator_service_client::RoomAllocatorServiceClient;

/// Adds `authorization: Bearer <token>` when a token was given.
#[derive(Clone)]
struct BearerToken(Option<MetadataValue<Ascii>>);

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(token) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        Ok(request)
    }
}

type Client = RoomAllocatorServiceClient<InterceptedService<Channel, BearerToken>>;

async fn channel(args: &ClientArgs) -> Result<Channel, Status> {
    let timeout = Duration::from_secs(args.timeout_secs);
    let mut endpoint = Endpoint::from_shared(args.server.clone())
        .map_err(|error| {
            Status::invalid_argument(format!(
                "--server {:?} is not a URL ({error}); use e.g. http://127.0.0.1:50051",
                args.server
            ))
        })?
        .connect_timeout(timeout)
        .timeout(timeout);
    if let Some(ca) = &args.tls_ca {
        let pem = std::fs::read(ca).map_err(|error| {
            Status::invalid_argument(format!("cannot read --tls-ca {}: {error}", ca.display()))
        })?;
        endpoint = endpoint
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
            .map_err(|error| Status::invalid_argument(format!("bad TLS settings: {error}")))?;
    }
    endpoint.connect().await.map_err(|error| {
        Status::unavailable(format!(
            "cannot connect to {}: {error}; is `room-allocator serve` running there?",
            args.server
        ))
    })
}

async fn connect(args: &ClientArgs) -> Result<Client, Status> {
    let token = match &args.token {
        Some(token) => Some(
            format!("Bearer {token}")
                .parse()
                .map_err(|_| Status::invalid_argument("--token must be printable ASCII"))?,
        ),
        None => None,
    };
    Ok(RoomAllocatorServiceClient::with_interceptor(
        channel(args).await?,
        BearerToken(token),
    ))
}

pub async fn health(args: HealthArgs) -> Result<(), Status> {
    let mut client = HealthClient::new(channel(&args.client).await?);
    let status = client
        .check(tonic_health::pb::HealthCheckRequest {
            service: args.service.clone(),
        })
        .await?
        .into_inner()
        .status();
    print(json!({ "service": args.service, "status": status.as_str_name() }));
    if status == tonic_health::pb::health_check_response::ServingStatus::Serving {
        Ok(())
    } else {
        Err(Status::unavailable(format!(
            "{:?} is {}",
            args.service,
            status.as_str_name()
        )))
    }
}

fn print(line: serde_json::Value) {
    println!("{line}");
}

pub async fn register(args: RegisterArgs) -> Result<(), Status> {
    let mut client = connect(&args.client).await?;
    let response = client
        .register_worker(pb::RegisterWorkerRequest {
            prefill_worker: args.worker,
            dp_size: args.dp_size,
        })
        .await?
        .into_inner();
    let worker = response
        .worker
        .ok_or_else(|| Status::new(Code::Internal, "the server sent no worker"))?;
    print(json!({
        "prefill_worker": worker.prefill_worker,
        "dp_size": worker.dp_size,
        "rooms_issued": worker.rooms_issued,
    }));
    Ok(())
}

pub async fn allocate(args: AllocateArgs) -> Result<(), Status> {
    let mut client = connect(&args.client).await?;
    for _ in 0..args.count {
        let response = client
            .allocate_room(pb::AllocateRoomRequest {
                prefill_worker: args.worker.clone(),
                dp_rank: args.rank,
                dp_size: args.dp_size,
            })
            .await?
            .into_inner();
        print(json!({
            "prefill_worker": args.worker,
            "dp_rank": args.rank,
            "room": response.room,
            "dp_size": response.dp_size,
        }));
    }
    Ok(())
}

pub async fn resolve(args: ResolveArgs) -> Result<(), Status> {
    let mut client = connect(&args.client).await?;
    let response = client
        .resolve_rank(pb::ResolveRankRequest { room: args.room })
        .await?
        .into_inner();
    print(json!({
        "room": args.room,
        "prefill_worker": response.prefill_worker,
        "dp_rank": response.dp_rank,
        "dp_size": response.dp_size,
    }));
    Ok(())
}

pub async fn workers(args: ClientArgs) -> Result<(), Status> {
    let mut client = connect(&args).await?;
    let response = client
        .list_workers(pb::ListWorkersRequest {})
        .await?
        .into_inner();
    for worker in response.workers {
        print(json!({
            "prefill_worker": worker.prefill_worker,
            "dp_size": worker.dp_size,
            "rooms_issued": worker.rooms_issued,
        }));
    }
    Ok(())
}
