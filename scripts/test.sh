#!/usr/bin/env bash
# Runs the whole test suite: installs what the tests need (etcd 3.4.23 and 3.5.1, etcdctl,
# the Python etcd3 client), checks formatting and lints, then runs every test against real etcd,
# and a subset again with the proxy on several event loops (--workers 2).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

echo "==> cargo fmt --check"
cargo fmt --all -- --check

echo "==> cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

echo "==> cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace --all-targets --locked "$@" 2>&1 | tee "$log" || status=$?

# The same proxy with several event loops (--workers 2): the areas where threads meet (shared
# watches, the read cache, sessions, failover, restarts, the size budget) run again.
if [ "$status" -eq 0 ] && [ "$#" -eq 0 ]; then
    echo "==> cargo test, proxies started with --workers 2 (a subset)"
    ETCD_COMPAT_TEST_PROXY_WORKERS=2 cargo test -p etcd-compat-tests --test integration --locked -- \
        watch_coalescing read_cache auth_sessions shared_sessions restarts failover size_budget byte_fidelity \
        2>&1 | tee -a "$log" || status=$?
fi
# One closing line for the whole run: cargo prints a summary per test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "total: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
