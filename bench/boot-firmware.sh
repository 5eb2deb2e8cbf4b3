#!/usr/bin/env bash
# Boot time, --boot direct (PVH) vs --boot firmware (reset vector, real mode,
# the bundled firmware, then the same PVH entry): same guest, same run, runs
# interleaved. Prints medians of two spans: process start to exit (wall), and
# VM creation to guest exit as vkvm measures it (`elapsed_ms` in
# --stats-json), which leaves out process start-up and tear-down.
# Usage: bench/boot-firmware.sh [RUNS]   (needs /dev/kvm)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-21}
cargo build --release -q
vkvm=${CARGO_TARGET_DIR:-target}/release/vkvm
stats=$(mktemp --suffix=.json)
trap 'rm -f "$stats"' EXIT
# The guest does (almost) nothing: one PIO round trip, then it exits.
cmdline='tests=pio-bench pio-iters=1'
ns() { date +%s%N; }
# Prints "wall_us vmm_us" for one run of --boot $1.
one() {
  local t0 t1
  t0=$(ns)
  "$vkvm" run --boot "$1" --cmdline "$cmdline" --stats-json "$stats" >/dev/null
  t1=$(ns)
  echo "$(( (t1 - t0) / 1000 )) $(grep -o '"elapsed_ms": [0-9.]*' "$stats" | awk '{printf "%d", $2 * 1000}')"
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
one direct >/dev/null; one firmware >/dev/null   # warm the page cache
dw=(); dv=(); fw=(); fv=()
for _ in $(seq "$runs"); do
  read -r w v < <(one direct); dw+=("$w"); dv+=("$v")
  read -r w v < <(one firmware); fw+=("$w"); fv+=("$v")
done
row() {
  local d f
  d=$(printf '%s\n' "${!2}" | median)
  f=$(printf '%s\n' "${!3}" | median)
  printf '%-44s %9s %9s %6s %9s\n' "$1" "$d" "$f" \
    "$(awk -v a="$f" -v b="$d" 'BEGIN{printf "%.2f", a/b}')" "$((f - d))"
}
echo "runs: $runs each, interleaved; medians in us"
printf '%-44s %9s %9s %6s %9s\n' "" direct firmware ratio f-d
row "process start to exit (wall)" 'dw[@]' 'fw[@]'
row "VM creation to guest exit (vkvm elapsed_ms)" 'dv[@]' 'fv[@]'
