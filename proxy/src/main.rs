//! The `etcd-compat-proxy` binary: parse the command line, install the crypto provider, run.

use std::process::ExitCode;

use clap::Parser;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = etcd_compat_proxy::Cli::parse();
    etcd_compat_proxy::install_crypto_provider();
    etcd_compat_proxy::execute(cli)
}
