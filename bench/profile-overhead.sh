#!/usr/bin/env bash
# Cost of exit profiling: the guest's own median PIO round trip (exit-storm,
# ring 3, rdtsc) with profiling off (`vkvm run`) and on (`vkvm profile`),
# alternating in one run. Usage: bench/profile-overhead.sh [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-7}
cargo build --release -q
vkvm=target/release/vkvm
wl='tests=exit-storm storm-iters=10000'
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
off=(); on=()
for _ in $(seq "$runs"); do
  off+=("$($vkvm run --cmdline "$wl" | grep -o 'pio_out_p50=[0-9]*' | cut -d= -f2)")
  on+=("$($vkvm profile --cmdline "$wl" --out "$tmp" | grep -o 'pio_out_p50=[0-9]*' | cut -d= -f2)")
done
a=$(printf '%s\n' "${off[@]}" | median); b=$(printf '%s\n' "${on[@]}" | median)
echo "runs: $runs (medians of per-run guest medians, cycles per PIO round trip)"
echo "profiling off: $a"
echo "profiling on:  $b"
awk -v a="$a" -v b="$b" 'BEGIN{printf "on/off: %.4f (%+.2f%%)\n", b/a, (b/a-1)*100}'
