#!/usr/bin/env bash
# Benchmarks one etcd 3.4.23 member directly, through `etcd grpc-proxy` and through
# etcd-compat-proxy, in one run: installs what is missing, builds both binaries in release
# mode, runs them, prints a markdown table and writes it to bench/RESULTS.md. Workloads that
# read serializably also run against etcd-compat-proxy with its cache off
# (`etcd-compat-proxy (no cache)`, --serializable-cache-bytes 0).
#
#   scripts/bench.sh                 full run (3 alternating rounds, 5 s windows; ~15 minutes)
#   scripts/bench.sh --quick         smoke run (1 round, 1 s windows; ~2 minutes)
#   scripts/bench.sh --only watch    just the workloads whose name contains "watch" (fan-out to
#                                    100-10000 watchers, on one key or one prefix)
#   scripts/bench.sh --only fleet    just `fleet mixed`: agents watching a prefix and polling a
#                                    key with serializable Ranges (--fleet-agents, default 200)
#   scripts/bench.sh --only 1GiB     just `range 1GiB paged`: loads 1 GiB into etcd, then pages
#                                    through it once per round and target (~1 minute in all)
#   scripts/bench.sh --big           everything, `range 1GiB paged` included (it is opt-in: a plain
#                                    run or `--only range` leaves it out)
#   scripts/bench.sh --pin           each proxy on a core of its own (etcd and the load generator on
#                                    CPU 0, proxies on CPU 1), as a sidecar; report in bench/RESULTS-pinned.md
#   scripts/bench.sh --h2-floor      also measures `h2 floor`, a bare forwarder on the proxy's h2 crate
#                                    and settings: what of the proxy's cost is its own
#   scripts/bench.sh --help          every flag
set -euo pipefail
cd "$(dirname "$0")/.."

# Idempotent: when everything is installed it only verifies (about a second).
scripts/install-deps.sh

cargo build --release -p etcd-compat-proxy -p etcd-compat-bench

# The report quotes the command exactly as typed, shell-quoted.
BENCH_INVOCATION="scripts/bench.sh"
if [ "$#" -gt 0 ]; then
    BENCH_INVOCATION+="$(printf ' %q' "$@")"
fi
export BENCH_INVOCATION
exec "${CARGO_TARGET_DIR:-target}/release/etcd-compat-bench" "$@"
