//! etcd-compat-proxy: a gRPC proxy that keeps legacy etcd v3 clients working while the cluster
//! behind it is renewed, upgraded and repaired.
//!
//! A call's path, in the order it is taken:
//! - [`server`] binds the listeners and runs the accept loop (startup and shutdown in one place);
//! - [`listener`] takes each client connection through its TLS handshake and the HTTP/2 preface
//!   within a deadline, repairs header blocks that old clients get wrong, and serves its calls;
//! - [`call`] is the request path: what etcd would refuse is refused the same way, the request
//!   is read, the caller's auth session ([`auth`]) supplies etcd's token, and the call is served
//!   by its method's kind (from [`grpc`]'s method table): sent to a member and retried elsewhere
//!   when safe, Ranges paged under a legacy client's size budget ([`budget`]), Watch and
//!   keep-alive streams relayed by tasks that outlive a member;
//! - [`upstream`] is the cluster behind the proxy: members, health, the cluster view and the
//!   routing rules; [`transport`] is HTTP/2 on the wire, two connections per member;
//! - the answer goes back as etcd's bytes, and its outcome is counted in [`admin`]'s metrics.
//!
//! Beside the path: [`cli`] reads the command line into a validated [`config::Config`]; [`tls`]
//! builds, reloads and tracks certificates; [`admin`] serves the status page, `/health`, `/ready`,
//! `/metrics`, `/doctor` and the migration's calls; [`service_manager`] tells systemd when the
//! proxy is ready or stopping; [`migrate`] mirrors the cluster onto a new one, revision for
//! revision; [`doctor`] diagnoses the cluster as a client and [`recover`] runs the NOSPACE
//! runbook on it; [`error`] is every status the proxy makes itself, in [`etcd_errors`]' words
//! where etcd has them; [`explain`] turns the statuses and dial failures the field reports
//! describe into one log line a minute that names the cause and the command that helps.
//! Modules only depend downward: the transport and [`grpc`] on nothing, [`upstream`] never on the
//! request path, the configuration never on the command line.

mod admin;
mod auth;
mod budget;
mod cache;
mod call;
mod cli;
mod cluster_access;
mod config;
mod doctor;
mod error;
mod etcd_errors;
mod explain;
#[cfg(test)]
mod fuzz;
mod grpc;
mod listener;
mod migrate;
mod recover;
mod server;
mod service_manager;
mod tls;
mod transport;
mod upstream;

use std::process::ExitCode;

pub use cli::{Cli, Command};
pub use config::Config;

/// How the proxy speaks HTTP/2 on its connections (windows, frame size, batched small writes),
/// for a tool that must speak it the same way: the benchmark's h2 floor.
pub mod http2 {
    pub use crate::transport::{
        BatchedWrites, CLIENT_CONNECTION_WINDOW, MAX_FRAME_SIZE, MAX_SEND_BUFFER, STREAM_WINDOW,
        UPSTREAM_CONNECTION_WINDOW,
    };
}

/// Installs the process-wide rustls crypto provider (ring), for any code that relies on the default.
pub fn install_crypto_provider() {
    // Only fails if a provider is already installed, which is fine: ours are passed explicitly.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Runs a parsed command line to completion and returns the process exit code.
pub fn execute(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Certs(args) => cli::certs::run(args),
        Command::Migrate(args) => cli::migrate::run(args),
        Command::Doctor(args) => cli::doctor::run(args),
        Command::RecoverSpace(args) => cli::recover_space::run(args),
        Command::Start(args) => {
            let config = match args.merge_config_file().and_then(|args| args.validate()) {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("etcd-compat-proxy: {error}");
                    return ExitCode::from(2);
                }
            };
            init_logging(config.debug);
            // One worker: everything on this thread, with no cross-thread wake-ups (the cheapest
            // per call). More: a pool of event loops sharing every part of the proxy.
            let mut builder = match config.workers {
                1 => tokio::runtime::Builder::new_current_thread(),
                workers => {
                    let mut builder = tokio::runtime::Builder::new_multi_thread();
                    builder.worker_threads(workers).thread_name("proxy-worker");
                    builder
                }
            };
            let runtime = match builder.enable_all().build() {
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

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::Path;

    /// The top-level modules each top-level module names (`crate::x`), from the sources.
    fn dependencies() -> BTreeMap<String, BTreeSet<String>> {
        fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                match path.is_dir() {
                    true => sources(&path, out),
                    false if path.extension().is_some_and(|e| e == "rs") => out.push(path),
                    false => {}
                }
            }
        }
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        sources(&root, &mut files);
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for file in files {
            let relative = file.strip_prefix(&root).unwrap();
            let module = relative.iter().next().unwrap().to_string_lossy().trim_end_matches(".rs").to_owned();
            if ["lib", "main", "fuzz"].contains(&module.as_str()) {
                continue;
            }
            let text = std::fs::read_to_string(&file).unwrap();
            // Unit tests may build what they test from the command line; only the code counts.
            let text = text.split("\n#[cfg(test)]\nmod tests").next().unwrap_or_default();
            let used = graph.entry(module.clone()).or_default();
            for (at, _) in text.match_indices("crate::") {
                let name: String =
                    text[at + 7..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                let is_module = root.join(&name).is_dir() || root.join(format!("{name}.rs")).exists();
                if is_module && name != module {
                    used.insert(name);
                }
            }
        }
        graph
    }

    #[test]
    fn no_module_reaches_back_up() {
        let graph = dependencies();
        assert!(graph.len() >= 14, "modules found: {:?}", graph.keys());
        // Depth-first search for a cycle, reporting the first one found.
        fn visit(
            module: &str,
            graph: &BTreeMap<String, BTreeSet<String>>,
            path: &mut Vec<String>,
            done: &mut BTreeSet<String>,
        ) -> Option<Vec<String>> {
            if let Some(at) = path.iter().position(|m| m == module) {
                return Some(path[at..].to_vec());
            }
            if !done.insert(module.to_owned()) {
                return None;
            }
            path.push(module.to_owned());
            for next in graph.get(module).into_iter().flatten() {
                if let Some(cycle) = visit(next, graph, path, done) {
                    return Some(cycle);
                }
            }
            path.pop();
            None
        }
        let mut done = BTreeSet::new();
        for module in graph.keys() {
            let cycle = visit(module, &graph, &mut Vec::new(), &mut done);
            assert!(cycle.is_none(), "modules that reach back up: {}", cycle.unwrap_or_default().join(" -> "));
        }
        // The layering the crate's documentation promises.
        for (low, never) in [("transport", "upstream"), ("grpc", "call"), ("upstream", "call"), ("config", "cli")] {
            assert!(!graph[low].contains(never), "{low} depends on {never}");
        }
        assert!(graph["transport"].is_empty() && graph["grpc"].is_empty(), "{graph:?}");
    }
}
