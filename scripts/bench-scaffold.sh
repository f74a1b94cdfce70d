#!/usr/bin/env bash
# Scaffold-speed benchmark: how long `create-mcpay NAME -t TARGET -y --no-git` takes for each
# available target, with the release build. Prints one line per target; reproduce with
#   bash scripts/bench-scaffold.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-20}
cargo build --release --locked -q
bin="$PWD/target/release/create-mcpay"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
targets=$(ls templates | grep -v '^shared$')
printf '%-8s %6s %10s %10s %10s %8s\n' target runs "mean ms" "min ms" "max ms" files
for t in $targets; do
  times=()
  for i in $(seq 1 "$runs"); do
    dir="$work/p-$t-$i"
    s=$(date +%s%N)
    "$bin" "$dir" -t "$t" -y --no-git >/dev/null
    e=$(date +%s%N)
    times+=($(( (e - s) / 1000 )))
  done
  files=$(find "$work/p-$t-1" -type f | wc -l)
  printf '%s\n' "${times[@]}" | awk -v t="$t" -v n="$runs" -v f="$files" '
    { s += $1; if (min == "" || $1 < min) min = $1; if ($1 > max) max = $1 }
    END { printf "%-8s %6d %10.2f %10.2f %10.2f %8d\n", t, n, s / n / 1000, min / 1000, max / 1000, f }'
done
echo "reproduce: bash scripts/bench-scaffold.sh $runs"
