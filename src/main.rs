//! The `pgmirror` command line: parses arguments, sets up logging, loads and
//! validates the process's configuration, then hands over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pgmirror::config::{self, PartnerConfig, ProxyConfig, WitnessConfig};
use pgmirror::logging::{self, LogFormat};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

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
    /// Run a whole mirrored cluster on this machine, in the foreground, for a first try.
    Demo,
}

/// Exit status of a subcommand whose issue has not landed yet.
const NOT_IMPLEMENTED: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let loaded = match &cli.command {
        Commands::Partner { config } => {
            return match config::load::<PartnerConfig>(config) {
                Ok(config) => serve(pgmirror::partner::agent::run(config, shutdown_on_signal())),
                Err(err) => fail(err),
            };
        }
        Commands::Witness { config } => config::load::<WitnessConfig>(config).map(drop),
        Commands::Proxy { config } => {
            return match config::load::<ProxyConfig>(config) {
                Ok(config) => serve(pgmirror::proxy::run(config, shutdown_on_signal())),
                Err(err) => fail(err),
            };
        }
        Commands::Demo => Ok(()),
    };
    if let Err(err) = loaded {
        return fail(err);
    }
    eprintln!("pgmirror: this subcommand is not implemented yet");
    ExitCode::from(NOT_IMPLEMENTED)
}

fn fail(err: impl std::fmt::Display) -> ExitCode {
    eprintln!("pgmirror: {err}");
    ExitCode::FAILURE
}

/// Runs a long-lived process on a multi-threaded runtime until it returns.
fn serve<E: std::fmt::Display>(
    process: impl std::future::Future<Output = Result<(), E>>,
) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => return fail(err),
    };
    match runtime.block_on(process) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => fail(err),
    }
}

/// A token cancelled on SIGINT or SIGTERM; must be called inside the runtime
/// that awaits it, so it is created lazily there.
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
