#!/usr/bin/env bash
# Starts a local etcd with etcd-compat-proxy in front of it and shows a client going through the
# proxy. Installs etcd if it is missing. Stays up until Ctrl-C when run from a terminal.
set -euo pipefail
cd "$(dirname "$0")/.."

ETCD_CLIENT_PORT=${ETCD_CLIENT_PORT:-22379}
ETCD_PEER_PORT=${ETCD_PEER_PORT:-22380}
PROXY_ADDR=${PROXY_ADDR:-127.0.0.1:23790}
METRICS_ADDR=${METRICS_ADDR:-127.0.0.1:23791}

scripts/install-deps.sh
echo "==> building etcd-compat-proxy (release)"
cargo build --release --locked -p etcd-compat-proxy

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

echo "==> starting etcd $(/usr/bin/etcd --version | head -1 | awk '{print $3}') on 127.0.0.1:${ETCD_CLIENT_PORT} (log: $work/etcd.log)"
/usr/bin/etcd --name quickstart --data-dir "$work/etcd" \
  --listen-client-urls "http://127.0.0.1:${ETCD_CLIENT_PORT}" --advertise-client-urls "http://127.0.0.1:${ETCD_CLIENT_PORT}" \
  --listen-peer-urls "http://127.0.0.1:${ETCD_PEER_PORT}" --initial-advertise-peer-urls "http://127.0.0.1:${ETCD_PEER_PORT}" \
  --initial-cluster "quickstart=http://127.0.0.1:${ETCD_PEER_PORT}" >"$work/etcd.log" 2>&1 &
pids+=($!)

echo "==> starting etcd-compat-proxy on ${PROXY_ADDR} (admin: http://${METRICS_ADDR}; log: $work/proxy.log)"
target/release/etcd-compat-proxy start --endpoints="127.0.0.1:${ETCD_CLIENT_PORT}" \
  --listen-addr="${PROXY_ADDR}" --metrics-addr="http://${METRICS_ADDR}" >"$work/proxy.log" 2>&1 &
pids+=($!)

for _ in $(seq 1 100); do
  if curl -fsS "http://${METRICS_ADDR}/health" >/dev/null 2>&1; then break; fi
  sleep 0.1
done

run() { echo "\$ $*"; "$@"; }
export ETCDCTL_API=3
echo
echo "==> a client (etcdctl $(etcdctl version | head -1 | awk '{print $3}')) talking only to the proxy"
run etcdctl --endpoints="${PROXY_ADDR}" put greeting "hello through etcd-compat-proxy"
run etcdctl --endpoints="${PROXY_ADDR}" get greeting
run etcdctl --endpoints="${PROXY_ADDR}" get --rev=999999 greeting || true
run etcdctl --endpoints="${PROXY_ADDR}" endpoint status -w table
run curl -sS "http://${METRICS_ADDR}/health"
echo "\$ curl -sS http://${METRICS_ADDR}/metrics | grep -E 'grpc_server_handled_total|upstream_healthy'"
curl -sS "http://${METRICS_ADDR}/metrics" | grep -E '^(grpc_server_handled_total|etcd_compat_proxy_upstream_healthy)'

if [ -t 0 ]; then
  echo
  echo "etcd-compat-proxy is serving on ${PROXY_ADDR}; try: ETCDCTL_API=3 etcdctl --endpoints=${PROXY_ADDR} get --prefix ''"
  echo "Press Ctrl-C to stop."
  wait
fi
