#!/usr/bin/env bash
# Runs the whole test suite: installs what the tests need (etcd 3.4.23 and 3.5.1, etcdctl,
# the Python etcd3 client), checks formatting and lints, then runs every test against real etcd.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "==> cargo test"
cargo test --workspace --locked "$@"
