//! The `pgmirror` command line: parses arguments, sets up logging, loads and
//! validates the process's configuration, then hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pgmirror::config::{self, PartnerConfig, ProxyConfig, WitnessConfig};
use pgmirror::logging::{self, LogFormat};
use pgmirror::roles::Safety;
use pgmirror::runtime::{self, Threads};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// mimalloc: fewer instructions per allocation than glibc's malloc on the
/// proxy's login path, at the same memory per idle client.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Database mirroring for PostgreSQL: a principal and a mirror kept in step
/// by shipping WAL, a witness for automatic failover, and a proxy that sends
/// clients to the current principal.
#[derive(Debug, Parser)]
#[command(name = "pgmirror", version, about, long_about = None)]
struct Cli {
    /// Log line format on stderr (level from RUST_LOG, default info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Run the agent beside one PostgreSQL instance: controls it and ships its WAL to or from the peer.
    Partner {
        /// The partner's TOML configuration.
        #[arg(long)]
        config: PathBuf,
    },
    /// Run the witness: keeps the role table and arbitrates automatic failover.
    Witness {
        /// The witness's TOML configuration.
        #[arg(long)]
        config: PathBuf,
    },
    /// Run the PostgreSQL-wire proxy that routes clients to the current principal.
    Proxy {
        /// The proxy's TOML configuration.
        #[arg(long)]
        config: PathBuf,
    },
    /// Internal, started by `partner`: kills its PostgreSQL when the agent's
    /// lease ends or the agent dies.
    #[command(hide = true)]
    Fence {
        /// The data directory of the PostgreSQL to fence.
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Run a whole mirrored cluster on this machine, in the foreground, for a first try.
    Demo {
        /// Where configs, certificates, data and logs go; reused by a second run.
        #[arg(long, default_value = "pgmirror-demo")]
        dir: PathBuf,
        /// The proxy's port (0: a free one, chosen and printed by the demo).
        #[arg(long, default_value_t = 6432)]
        port: u16,
        /// full (synchronous) or off (asynchronous).
        #[arg(long, default_value = "full")]
        safety: Safety,
        /// Run without a witness (no automatic failover).
        #[arg(long)]
        no_witness: bool,
        /// TIMEOUT in seconds.
        #[arg(long, default_value_t = 10)]
        timeout: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    match cli.command {
        Commands::Partner { config } => match config::load::<PartnerConfig>(&config) {
            Ok(config) => serve(
                Threads::Exactly(config.threads),
                pgmirror::partner::run(config, shutdown_on_signal()),
            ),
            Err(err) => fail(err),
        },
        Commands::Witness { config } => match config::load::<WitnessConfig>(&config) {
            Ok(config) => serve(
                Threads::PerCore,
                pgmirror::witness::run(config, shutdown_on_signal()),
            ),
            Err(err) => fail(err),
        },
        Commands::Proxy { config } => match config::load::<ProxyConfig>(&config) {
            Ok(config) => serve(
                Threads::Exactly(config.threads),
                pgmirror::proxy::run(config, shutdown_on_signal()),
            ),
            Err(err) => fail(err),
        },
        Commands::Fence { data_dir } => {
            pgmirror::partner::fence::run(&data_dir);
            ExitCode::SUCCESS
        }
        Commands::Demo {
            dir,
            port,
            safety,
            no_witness,
            timeout,
        } => {
            let options = pgmirror::demo::DemoOptions {
                dir,
                port,
                safety,
                witness: !no_witness,
                timeout,
            };
            serve(
                Threads::PerCore,
                pgmirror::demo::run(options, shutdown_on_signal()),
            )
        }
    }
}

fn fail(err: impl std::fmt::Display) -> ExitCode {
    // `#` prints an anyhow error's whole chain of causes on one line.
    eprintln!("pgmirror: {err:#}");
    ExitCode::FAILURE
}

/// Runs a long-lived process until it returns.
fn serve<E: std::fmt::Display + Send + 'static>(
    threads: Threads,
    process: impl std::future::Future<Output = Result<(), E>> + Send + 'static,
) -> ExitCode {
    let runtime = match runtime::build(threads) {
        Ok(runtime) => runtime,
        Err(err) => return fail(err),
    };
    // With work stealing, on a worker rather than this thread: a task it
    // spawns (a connection per accept) then starts where it was spawned,
    // not by waking a parked worker through a futex, and its sockets'
    // readiness reaches it without another thread's wake-up. On one
    // thread, this thread is the worker.
    match runtime.block_on(runtime.spawn(process)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(err)) => fail(err),
        Err(err) => fail(err),
    }
}

/// A token cancelled on SIGINT or SIGTERM. The signals are watched on a
/// thread of their own, so the token can be made before the process's
/// runtime exists.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
        if let Ok(runtime) = runtime {
            runtime.block_on(async {
                let mut terminate = signal(SignalKind::terminate()).ok();
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = async { match terminate.as_mut() { Some(s) => { s.recv().await; } None => std::future::pending().await } } => {}
                }
                tracing::info!("shutting down");
                trigger.cancel();
            });
        }
    });
    token
}
