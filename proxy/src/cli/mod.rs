//! The command line: `start` (the proxy, with flags compatible with `etcd grpc-proxy start`,
//! each also an environment variable and a TOML key), `certs` (the certificate runbook),
//! `migrate` (the move to a new cluster, driven through a running proxy) and `doctor` (a
//! diagnosis of the cluster).
//! Reads and checks what the operator wrote, and hands the rest of the proxy a validated
//! [`crate::config::Config`]; nothing else depends on it.

pub mod certs;
pub mod doctor;
pub mod migrate;
pub mod start;

use clap::{Parser, Subcommand};

/// The `etcd-compat-proxy` command line.
#[derive(Debug, Parser)]
#[command(
    name = "etcd-compat-proxy",
    version,
    about = "A gRPC proxy that keeps legacy etcd v3 clients working while the cluster behind it is renewed, upgraded and repaired"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands of `etcd-compat-proxy`.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the proxy (flags compatible with `etcd grpc-proxy start`).
    Start(Box<start::StartArgs>),
    /// Create, renew and inspect certificates for etcd and this proxy.
    Certs(certs::CertsArgs),
    /// Move clients to a new cluster, revision for revision, through the running proxy.
    Migrate(migrate::MigrateArgs),
    /// Diagnose the cluster: members, space, certificates, auth, performance (changes nothing).
    Doctor(doctor::DoctorArgs),
}
