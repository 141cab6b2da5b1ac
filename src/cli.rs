//! The client subcommands: one JSON object per line on standard output, and
//! on failure the status code name and message on standard error. They use
//! the `room-allocator-client` crate, so they speak TLS, mutual TLS and the
//! bearer token exactly as a router would.

use std::time::Duration;

use serde_json::json;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Status;
use tonic_health::pb::health_client::HealthClient;

use room_allocator_client::{cause_chain, Error, RoomClient};

use crate::config::{
    AllocateArgs, ClientArgs, DeregisterArgs, HealthArgs, LeaseArgs, RegisterArgs, ResolveArgs,
};

/// How long a client command keeps trying to reach the server.
const CONNECT_PATIENCE: Duration = Duration::from_secs(3);

fn read(flag: &str, path: &std::path::Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path)
        .map_err(|error| Error::Config(format!("cannot read {flag} {}: {error}", path.display())))
}

async fn connect(args: &ClientArgs) -> Result<RoomClient, Error> {
    let timeout = Duration::from_secs(args.timeout_secs);
    let mut builder = RoomClient::builder([args.server.as_str()])
        .timeout(timeout)
        .connect_timeout(timeout)
        .connect_patience(CONNECT_PATIENCE);
    if let Some(token) = &args.token {
        builder = builder.bearer_token(token.expose());
    }
    if let Some(ca) = &args.tls_ca {
        builder = builder.ca_certificate_pem(read("--tls-ca", ca)?);
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        builder = builder.client_identity_pem(read("--tls-cert", cert)?, read("--tls-key", key)?);
    }
    if let Some(name) = &args.tls_server_name {
        builder = builder.tls_domain_name(name.clone());
    }
    builder.connect().await
}

fn print(line: serde_json::Value) {
    println!("{line}");
}

pub async fn register(args: RegisterArgs) -> Result<(), Error> {
    let client = connect(&args.client).await?;
    let worker = client.register(&args.worker, args.dp_size).await?;
    print(json!({
        "prefill_worker": worker.prefill_worker,
        "dp_size": worker.dp_size,
        "rooms_issued": worker.rooms_issued,
    }));
    Ok(())
}

pub async fn deregister(args: DeregisterArgs) -> Result<(), Error> {
    let client = connect(&args.client).await?;
    client.deregister(&args.worker).await?;
    print(json!({ "prefill_worker": args.worker, "deregistered": true }));
    Ok(())
}

/// One AllocateRoom call per room, so `--count` shows what the server hands
/// out (no lease on this path).
pub async fn allocate(args: AllocateArgs) -> Result<(), Error> {
    let client = connect(&args.client).await?;
    for _ in 0..args.count {
        let (room, dp_size) = client
            .allocate_room(&args.worker, args.rank, args.dp_size)
            .await?;
        print(json!({
            "prefill_worker": args.worker,
            "dp_rank": args.rank,
            "room": room,
            "dp_size": dp_size,
        }));
    }
    Ok(())
}

pub async fn lease(args: LeaseArgs) -> Result<(), Error> {
    let client = connect(&args.client).await?;
    let lease = client
        .lease_rooms(&args.worker, args.count, args.dp_size)
        .await?;
    print(json!({
        "prefill_worker": args.worker,
        "first_base": lease.first_base,
        "count": lease.count,
        "dp_size": lease.dp_size,
        "valid_for_ms": u64::try_from(lease.valid_for.as_millis()).unwrap_or(u64::MAX),
    }));
    Ok(())
}

pub async fn resolve(args: ResolveArgs) -> Result<(), Error> {
    let client = connect(&args.client).await?;
    let resolved = client.resolve(args.room).await?;
    print(json!({
        "room": args.room,
        "prefill_worker": resolved.prefill_worker,
        "dp_rank": resolved.dp_rank,
        "dp_size": resolved.dp_size,
    }));
    Ok(())
}

pub async fn workers(args: ClientArgs) -> Result<(), Error> {
    let client = connect(&args).await?;
    for worker in client.workers().await? {
        print(json!({
            "prefill_worker": worker.prefill_worker,
            "dp_size": worker.dp_size,
            "rooms_issued": worker.rooms_issued,
        }));
    }
    Ok(())
}

/// grpc.health.v1 is not part of the client crate; this speaks it over a
/// channel set up the same way (TLS, mutual TLS).
pub async fn health(args: HealthArgs) -> Result<(), Error> {
    let channel = health_channel(&args.client).await?;
    let mut client = HealthClient::new(channel);
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
        Err(Error::Status(Status::unavailable(format!(
            "{:?} is {}",
            args.service,
            status.as_str_name()
        ))))
    }
}

async fn health_channel(args: &ClientArgs) -> Result<Channel, Error> {
    let tls = args.tls_ca.is_some() || args.tls_cert.is_some();
    let url = if args.server.contains("://") {
        args.server.clone()
    } else if tls {
        format!("https://{}", args.server)
    } else {
        format!("http://{}", args.server)
    };
    let timeout = Duration::from_secs(args.timeout_secs);
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|error| {
            Error::Config(format!(
                "--server {:?} is not a URL ({error}); use e.g. 127.0.0.1:50051",
                args.server
            ))
        })?
        .connect_timeout(timeout)
        .timeout(timeout);
    if url.starts_with("https://") {
        let mut config = ClientTlsConfig::new();
        if let Some(ca) = &args.tls_ca {
            config = config.ca_certificate(Certificate::from_pem(read("--tls-ca", ca)?));
        }
        if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
            config = config.identity(Identity::from_pem(
                read("--tls-cert", cert)?,
                read("--tls-key", key)?,
            ));
        }
        if let Some(name) = &args.tls_server_name {
            config = config.domain_name(name.clone());
        }
        endpoint = endpoint
            .tls_config(config)
            .map_err(|error| Error::Config(format!("bad TLS settings: {}", cause_chain(&error))))?;
    }
    endpoint.connect().await.map_err(|error| Error::Connect {
        url,
        reason: cause_chain(&error),
    })
}
