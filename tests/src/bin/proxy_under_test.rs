//! The proxy binary, as `proxy/src/main.rs` builds it, for the integration tests.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = etcd_compat_proxy::Cli::parse();
    etcd_compat_proxy::install_crypto_provider();
    etcd_compat_proxy::execute(cli)
}
