//! `etcd-compat-proxy doctor`: one diagnosis of the cluster behind the proxy's configuration,
//! for people (a line per check, the fix under each finding) or scripts (`--output json`).
//!
//! Exit codes: 0 every check ok, 1 a warning, 2 a critical finding, 3 the configuration is invalid.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Args, ValueEnum};

use super::start::StartArgs;
use crate::cluster_access::ClusterAccess;
use crate::doctor::{self, Settings};

/// `etcd-compat-proxy doctor`.
#[derive(Debug, Args)]
#[command(
    about = "Diagnose the cluster behind the proxy: members, space, certificates, auth, performance",
    long_about = "Diagnose the cluster behind the proxy: members, space, certificates, auth, performance.\n\n\
        Takes the same flags, environment variables and --config file as `start` (only the cluster, TLS, \
        auth and doctor settings matter), reads the cluster as a client and changes nothing. One line per \
        check, with the evidence and the exact fix under each finding. A running proxy serves the same \
        report as JSON at /doctor on its --metrics-addr. Exit codes: 0 ok, 1 warning, 2 critical, \
        3 invalid configuration."
)]
pub struct DoctorArgs {
    /// `text` for people (coloured on a terminal unless NO_COLOR is set), `json` for scripts.
    #[arg(long, env = "ETCD_COMPAT_PROXY_DOCTOR_OUTPUT", value_enum, default_value_t = Output::Text)]
    pub output: Output,
    #[command(flatten)]
    pub start: Box<StartArgs>,
}

/// How the report is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// Runs `doctor` and returns its exit code.
pub fn run(args: DoctorArgs) -> ExitCode {
    let config = match args.start.merge_config_file().and_then(|start| start.validate()) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("etcd-compat-proxy doctor: {error}");
            return ExitCode::from(3);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("etcd-compat-proxy doctor: cannot start the async runtime: {error}");
            return ExitCode::from(3);
        }
    };
    let (certs, cert_errors) = proxy_certificates(&config);
    let access = ClusterAccess::source_of(&config);
    let report = runtime.block_on(doctor::diagnose(&access, &Settings::of(&config), certs, cert_errors));
    match args.output {
        Output::Json => println!("{}", report.to_json()),
        Output::Text => {
            let colour = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            print!("{}", report.to_text(colour));
        }
    }
    ExitCode::from(report.verdict.exit_code())
}

/// The certificates `start` would load, and why any cannot be.
fn proxy_certificates(config: &crate::Config) -> (Vec<crate::tls::LoadedCert>, Vec<String>) {
    let mut certs = Vec::new();
    let mut errors = Vec::new();
    if let Some(files) = &config.listener_tls {
        let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        match crate::tls::build_listener(files, &counter) {
            Ok(built) => certs.extend(built.certs),
            Err(error) => errors.push(format!("the listener's TLS files cannot be loaded: {error}")),
        }
    }
    if let Some(files) = &config.upstream_tls {
        match crate::tls::build_upstream(files) {
            Ok(built) => certs.extend(built.certs),
            Err(error) => errors.push(format!("the upstream TLS files cannot be loaded: {error}")),
        }
    }
    (certs, errors)
}
