//! The `room-allocator` binary: flags, logging, runtime, then a library call.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;
use tracing::info;
use tracing_subscriber::EnvFilter;

use room_allocator::cli;
use room_allocator::config::{Cli, Command, LogFormat, MigrateArgs, ServeArgs};
use room_allocator::server::Server;
use room_allocator::service::code_name;
use room_allocator::space::MAX_ROOM;
use room_allocator::store::EmbeddedStore;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    if let Command::Bench(args) = cli.command {
        // The load generator sets up its own runtime (--worker-threads).
        return exit_code(room_allocator::bench::run(*args));
    }
    let worker_threads = match &cli.command {
        Command::Serve(args) => args.worker_threads,
        _ => Some(1),
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = worker_threads {
        runtime.worker_threads(threads.max(1));
    }
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("room-allocator: cannot start the tokio runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let outcome = match cli.command {
            Command::Serve(args) => return serve(*args).await,
            Command::Register(args) => cli::register(args).await,
            Command::Allocate(args) => cli::allocate(args).await,
            Command::Resolve(args) => cli::resolve(args).await,
            Command::Workers(args) => cli::workers(args).await,
            Command::Health(args) => cli::health(args).await,
            Command::Migrate(args) => return exit_code(try_migrate(*args).await),
            Command::Bench(_) => unreachable!("bench runs before the runtime starts"),
        };
        match outcome {
            Ok(()) => ExitCode::SUCCESS,
            Err(status) => {
                eprintln!(
                    "room-allocator: {}: {}",
                    code_name(status.code()),
                    status.message()
                );
                ExitCode::FAILURE
            }
        }
    })
}

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Success, or the error with its context chain on standard error.
fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("room-allocator: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> ExitCode {
    let result = try_serve(args).await;
    if let Err(error) = &result {
        // Also in the log stream, for operators reading JSON logs.
        tracing::error!("{error:#}");
    }
    exit_code(result)
}

async fn try_serve(args: ServeArgs) -> anyhow::Result<()> {
    if args.check_config {
        eprintln!("room-allocator: configuration accepted");
        return Ok(());
    }
    // A full disk or a file-size limit must surface as an I/O error (and
    // UNAVAILABLE), not kill the process: take SIGXFSZ off its default action.
    let _xfsz =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(libc::SIGXFSZ))
            .context("cannot handle SIGXFSZ")?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot handle SIGTERM")?;

    let store = if args.etcd.etcd_endpoints.is_empty() {
        format!("--data-dir {}", args.data_dir.display())
    } else {
        format!("--etcd-endpoints {}", args.etcd.etcd_endpoints.join(","))
    };
    let server = Server::open(&args)
        .await
        .with_context(|| format!("cannot start the server ({store})"))?;
    let grpc = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot bind --listen {}", args.listen))?;
    let metrics = TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("cannot bind --metrics-listen {}", args.metrics_listen))?;
    info!(
        grpc_addr = %grpc.local_addr().context("gRPC listener address")?,
        metrics_addr = %metrics.local_addr().context("metrics listener address")?,
        data_dir = %args.data_dir.display(),
        store = server.allocator().store_kind(),
        "listening"
    );
    let shutdown = async move {
        tokio::select! {
            _ = terminate.recv() => info!("received SIGTERM"),
            _ = tokio::signal::ctrl_c() => info!("received SIGINT"),
        }
    };
    server.serve(grpc, metrics, shutdown).await?;
    Ok(())
}

async fn try_migrate(args: MigrateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.etcd.etcd_endpoints.is_empty(),
        "--etcd-endpoints is required: where to migrate to"
    );
    // Opening takes the data dir's lock: no server may issue rooms meanwhile.
    let (store, snapshot) = EmbeddedStore::open(&args.data_dir, MAX_ROOM + 1)
        .with_context(|| format!("cannot open --data-dir {}", args.data_dir.display()))?;
    let config = args
        .etcd
        .store_config(std::time::Duration::from_secs(args.store_timeout_secs));
    let report = room_allocator::store::etcd::import(&config, &snapshot)
        .await
        .with_context(|| {
            format!(
                "cannot migrate into --etcd-endpoints {}",
                config.endpoints.join(",")
            )
        })?;
    drop(store);
    let target = format!(
        "etcd {} prefix {}",
        config.endpoints.join(","),
        config.prefix
    );
    EmbeddedStore::mark_migrated(&args.data_dir, &target).with_context(|| {
        format!(
            "migrated, but cannot mark --data-dir {} as migrated",
            args.data_dir.display()
        )
    })?;
    println!(
        "{}",
        serde_json::json!({
            "high_water": report.high_water,
            "ranges": report.ranges,
            "workers": report.workers,
            "etcd_prefix": args.etcd.etcd_prefix,
        })
    );
    info!("migrated; start the replicas with --etcd-endpoints (the data dir now refuses to serve)");
    Ok(())
}
