//! etcd-compat-proxy: a gRPC proxy that keeps legacy etcd v3 clients working while the cluster
//! behind it is renewed, upgraded and repaired.
//!
//! A call's path, in the order it is taken:
//! - [`server`] accepts the client connection (plaintext or TLS) and speaks HTTP/2, after
//!   [`legacy_authority`] has repaired header blocks that old clients get wrong;
//! - [`forward`] classifies the call by its method ([`grpc`]), picks a member from the pool
//!   ([`upstream`]) by the routing rules of the cluster view ([`cluster`]: leader, learners,
//!   discovered members) and forwards the bytes, retrying on another member only when safe;
//!   Ranges from clients with a message size limit are paged under [`budget`]; lease
//!   keep-alive streams move between members ([`keepalive`]);
//!   each member has one HTTP/2 [`connection`], on which the calling task sends directly;
//! - [`body`] relays etcd's answer ([`h2_stream`]) and records the outcome in [`metrics`];
//! - [`admin`] serves `/health` and `/metrics`; [`config`] and [`tls`] turn flags into all of this;
//!   [`error`] is where the proxy's own failures become gRPC statuses;
//! - [`reload`] swaps TLS material when its files change or on SIGHUP ([`cert_reload_wiring`]),
//!   [`verify`] holds the opt-in certificate exceptions, [`cert_status`] tracks expiry.

pub mod accept;
pub mod admin;
pub mod admission;
pub mod auth;
pub mod batched_writes;
pub mod body;
pub mod budget;
pub mod cert_reload_wiring;
pub mod cert_status;
pub mod certs_cli;
pub mod client_queue;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod error;
pub mod forward;
#[cfg(test)]
mod fuzz;
pub mod grpc;
pub mod h2_stream;
pub mod keepalive;
pub mod legacy_authority;
pub mod metrics;
pub mod reload;
pub mod server;
pub mod tls;
pub mod upstream;
pub mod verify;
pub mod watch;

use std::process::ExitCode;

pub use config::{Cli, Command, Config};

/// Installs the process-wide rustls crypto provider (ring), for any code that relies on the default.
pub fn install_crypto_provider() {
    // Only fails if a provider is already installed, which is fine: ours are passed explicitly.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Runs a parsed command line to completion and returns the process exit code.
pub fn execute(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Certs(args) => certs_cli::run(args),
        Command::Start(args) => {
            let config = match args.merge_config_file().and_then(|args| args.validate()) {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("etcd-compat-proxy: {error}");
                    return ExitCode::from(2);
                }
            };
            init_logging(config.debug);
            let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(runtime) => runtime,
                Err(error) => {
                    eprintln!("etcd-compat-proxy: cannot start the async runtime: {error}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(server::run(config, shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!("{error}");
                    eprintln!("etcd-compat-proxy: {error}");
                    // A port in use or TLS material that cannot be loaded is a setup problem, as
                    // invalid flags are: the same exit code, so that unit files treat them alike.
                    ExitCode::from(2)
                }
            }
        }
    }
}

fn init_logging(debug: bool) {
    let default = if debug { "debug,h2=info,hyper=info,rustls=info,loona_hpack=info" } else { "info" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).try_init();
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            tracing::warn!("cannot install signal handlers; stop the proxy with SIGKILL");
            std::future::pending::<()>().await
        }
    }
}
