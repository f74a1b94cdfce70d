#!/usr/bin/env bash
# Benchmark on loopback: builds in release mode, starts the server on a fresh SQLite file,
# drives GET /v1/health and paid calls with many concurrent connections across many keys
# (examples/bench.rs), prints requests/s, p50/p99 latency and peak RSS, then checks that no
# key overdrew. Bounded: BENCH_REQUESTS (default 20000) per phase, BENCH_SECONDS (default 30)
# per phase, BENCH_CONCURRENCY (default 64). Then examples/bench_proxy.rs: what /mcp/<name> adds to
# an MCP server (p50/p99 and throughput, proxied versus direct).
set -euo pipefail
cd "$(dirname "$0")/.."

bin=$(sed -n 's/^name = "\(.*\)"/\1/p' Cargo.toml | head -1)
echo "building $bin (release)..."
cargo build --release --locked --bin "$bin" --example bench --example bench_proxy

work=$(mktemp -d)
server_pid=""
cleanup() {
  if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

target_dir=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
NO_COLOR=1 RUST_LOG="warn,gateway=info,gateway::app=warn" BIND=127.0.0.1 PORT=0 \
  DATABASE_URL="sqlite:$work/bench.db" ADMIN_KEY="" \
  "$target_dir/release/$bin" >"$work/server.log" 2>&1 &
server_pid=$!

addr=""
for _ in $(seq 1 100); do
  addr=$(grep -o 'addr=127\.0\.0\.1:[0-9]*' "$work/server.log" | head -1 | cut -d= -f2 || true)
  [ -n "$addr" ] && break
  sleep 0.1
done
if [ -z "$addr" ]; then echo "the server did not start:"; cat "$work/server.log"; exit 1; fi
echo "server pid $server_pid on $addr"

BENCH_URL="http://$addr" BENCH_DATABASE_URL="sqlite:$work/bench.db" BENCH_SERVER_PID="$server_pid" \
  timeout 600 "$target_dir/release/examples/bench"

# /mcp/<name>: a paid tools/call through the gateway versus the same MCP server called directly
# (both started by the example, in one run).
echo
NO_COLOR=1 RUST_LOG=warn timeout 600 "$target_dir/release/examples/bench_proxy"
