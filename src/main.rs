//! The `room-allocator` binary: flags, logging, runtime, then a library call.

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;
use tracing::info;
use tracing_subscriber::EnvFilter;

use room_allocator::cli;
use room_allocator::config::{Cli, Command, LogFormat, MigrateArgs, RetentionArgs, ServeArgs};
use room_allocator::server::{self, Server};
use room_allocator::space::Bounds;
use room_allocator::store::embedded::EmbeddedOptions;
use room_allocator::store::store_id::{check_data_dir, DataDirUse};
use room_allocator::store::{EmbeddedStore, Store};

fn main() -> ExitCode {
    room_allocator::failpoint::setup();
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    let format = cli.log_format;
    match cli.command {
        // The load generator sets up its own runtime (--worker-threads).
        Command::Bench(args) => return exit_code(format, room_allocator::bench::run(*args)),
        Command::ConfigSchema => {
            println!("{}", room_allocator::config::schema_json());
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    let worker_threads = match &cli.command {
        Command::Serve(args) => args.worker_threads.map(|n| usize::try_from(n).unwrap_or(1)),
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
            Command::Serve(args) => return exit_code(format, serve(*args).await),
            Command::Migrate(args) => return exit_code(format, migrate(*args).await),
            Command::Retention(args) => return exit_code(format, retention(*args).await),
            Command::Register(args) => cli::register(args).await,
            Command::Deregister(args) => cli::deregister(args).await,
            Command::Allocate(args) => cli::allocate(args).await,
            Command::Lease(args) => cli::lease(args).await,
            Command::Resolve(args) => cli::resolve(args).await,
            Command::Workers(args) => cli::workers(args).await,
            Command::Health(args) => cli::health(args).await,
            Command::Bench(_) | Command::ConfigSchema => unreachable!("handled above"),
        };
        match outcome {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                // Always the status code name, as grpcurl prints it.
                match &error {
                    room_allocator::client::Error::Status(_) => {
                        eprintln!("room-allocator: {error}")
                    }
                    _ => eprintln!(
                        "room-allocator: {}: {error}",
                        room_allocator::client::code_name(error.code())
                    ),
                }
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
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Success, or the error (with its context chain) printed once: as a JSON
/// log line when logs are JSON, else as one line on standard error.
fn exit_code(format: LogFormat, result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            match format {
                LogFormat::Json => tracing::error!(error = %format!("{error:#}"), "exiting"),
                LogFormat::Text => eprintln!("room-allocator: {error:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.server_config()?;
    if args.check_config {
        server::check_config(&config)?;
        info!("configuration accepted");
        return Ok(());
    }
    // A full disk or a file-size limit must surface as an I/O error (and
    // UNAVAILABLE), not kill the process: take SIGXFSZ off its default action.
    let _xfsz =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::from_raw(libc::SIGXFSZ))
            .context("cannot handle SIGXFSZ")?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot handle SIGTERM")?;

    let server = Server::open(&config).await?;
    let grpc = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot bind --listen {}", args.listen))?;
    let metrics = TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("cannot bind --metrics-listen {}", args.metrics_listen))?;
    let health = match args.health_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot bind --health-listen {addr}"))?,
        ),
        None => None,
    };
    info!(
        grpc_addr = %grpc.local_addr().context("gRPC listener address")?,
        metrics_addr = %metrics.local_addr().context("metrics listener address")?,
        health_addr = health.as_ref().and_then(server::bound).map(|a| a.to_string()),
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
    server.serve(grpc, metrics, health, shutdown).await?;
    Ok(())
}

/// Moves the embedded store into etcd. The data dir is marked `MIGRATED`
/// (durably, while its lock is held) before anything is copied, so from that
/// moment no server serves it again, whatever happens next; a failed or
/// interrupted run is finished by running it again.
async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.etcd.etcd_endpoints.is_empty(),
        "--etcd-endpoints is required: where to migrate to"
    );
    // Only an existing store, and nothing created in the dir when refused:
    // a mistyped or unmounted --data-dir would otherwise migrate an empty
    // space, and etcd would hand its rooms out again.
    check_data_dir(&args.data_dir, DataDirUse::Migrate).context("--data-dir")?;
    let (store, snapshot) = EmbeddedStore::open_with(
        &args.data_dir,
        EmbeddedOptions {
            bounds: Bounds::FULL,
            for_migration: true,
        },
    )
    .with_context(|| format!("cannot open --data-dir {}", args.data_dir.display()))?;
    let store_id = store.store_id();
    let holds_nothing = snapshot.workers.is_empty()
        && snapshot.ranges.is_empty()
        && snapshot.high_water <= room_allocator::space::SPACE_START;
    anyhow::ensure!(
        !holds_nothing || args.allow_empty,
        "--data-dir {} holds an empty store (store id {}): no worker, no range, no room issued. If rooms were issued, this is the wrong dir or its volume is not mounted; to migrate the empty store anyway, pass --allow-empty",
        args.data_dir.display(),
        store_id.as_deref().unwrap_or("none")
    );
    let config = args.etcd.store_config(
        std::time::Duration::from_secs(args.store_timeout_secs),
        args.retention,
        Bounds::FULL,
    );
    let target = format!(
        "etcd {} prefix {}",
        config.endpoints.join(","),
        config.prefix
    );
    // Conflicts refuse before the data dir is marked, so it still serves.
    room_allocator::store::etcd::check_import(&config, &snapshot)
        .await
        .with_context(|| format!("cannot migrate into {target}; the data dir is unchanged"))?;
    store
        .mark_migrated(&args.data_dir, &target, false)
        .with_context(|| {
            format!(
                "cannot mark --data-dir {} as migrated",
                args.data_dir.display()
            )
        })?;
    let report = room_allocator::store::etcd::import(&config, &snapshot)
        .await
        .with_context(|| {
            format!(
                "the data dir is marked migrated but the copy into --etcd-endpoints {} failed; run migrate again to finish",
                config.endpoints.join(",")
            )
        })?;
    store
        .mark_migrated(&args.data_dir, &target, true)
        .with_context(|| {
            format!(
                "migrated, but cannot mark --data-dir {} complete; run migrate again",
                args.data_dir.display()
            )
        })?;
    drop(store);
    println!(
        "{}",
        serde_json::json!({
            "high_water": report.high_water,
            "ranges": report.ranges,
            "workers": report.workers,
            "etcd_prefix": args.etcd.etcd_prefix,
            "store_id": store_id,
        })
    );
    info!("migrated; start the replicas with --etcd-endpoints (the data dir now refuses to serve)");
    Ok(())
}

async fn retention(args: RetentionArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.etcd.etcd_endpoints.is_empty(),
        "--etcd-endpoints is required: the fleet's retention lives in etcd"
    );
    let config = args.etcd.store_config(
        std::time::Duration::from_secs(args.store_timeout_secs),
        room_allocator::config::parse_duration("24h").map_err(anyhow::Error::msg)?,
        Bounds::FULL,
    );
    let retention = room_allocator::store::etcd::retention(&config, args.set)
        .await
        .with_context(|| format!("--etcd-endpoints {}", config.endpoints.join(",")))?;
    println!(
        "{}",
        serde_json::json!({
            "retention_secs": retention.as_secs(),
            "etcd_prefix": args.etcd.etcd_prefix,
            "set": args.set.is_some(),
        })
    );
    Ok(())
}
