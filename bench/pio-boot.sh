#!/usr/bin/env bash
# PIO exit round trip (ring 3, rdtsc around `out`, median of 10000 per run)
# and boot time (process start to exit), vkvm vs QEMU, same guest, same run.
# Usage: bench/pio-boot.sh [RUNS]   (needs /dev/kvm and qemu-system-x86_64)
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
cargo build --release -q
vkvm=target/release/vkvm
guest=$(mktemp --suffix=.elf)
trap 'rm -f "$guest"' EXIT
$vkvm guest --output "$guest"
ms() { date +%s%N; }
qemu_run() {
  qemu-system-x86_64 -M microvm,x-option-roms=off,rtc=off -accel kvm -m 256 -nographic -no-reboot \
    -kernel "$guest" -device isa-debug-exit,iobase=0xf4,iosize=0x04 -append "$1" 2>/dev/null || true
}
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
declare -a vp vb qp qb
for _ in $(seq "$runs"); do
  out=$($vkvm run "$guest" --cmdline 'tests=pio-bench pio-iters=10000')
  vp+=("$(grep -o 'median_cycles=[0-9]*' <<<"$out" | cut -d= -f2)")
  out=$(qemu_run 'tests=pio-bench pio-iters=10000')
  qp+=("$(grep -o 'median_cycles=[0-9]*' <<<"$out" | cut -d= -f2)")
  # Boot time: the same guest doing (almost) nothing.
  t0=$(ms); $vkvm run "$guest" --cmdline 'tests=pio-bench pio-iters=1' >/dev/null; t1=$(ms); vb+=($(( (t1 - t0) / 1000 )))
  t0=$(ms); qemu_run 'tests=pio-bench pio-iters=1' >/dev/null; t1=$(ms); qb+=($(( (t1 - t0) / 1000 )))
done
khz=$($vkvm run "$guest" --cmdline 'tests=pio-bench pio-iters=1' | grep -o 'tsc_khz=[0-9]*' | cut -d= -f2)
vpm=$(printf '%s\n' "${vp[@]}" | median); qpm=$(printf '%s\n' "${qp[@]}" | median)
vbm=$(printf '%s\n' "${vb[@]}" | median); qbm=$(printf '%s\n' "${qb[@]}" | median)
echo "runs: $runs, TSC $khz kHz"
printf '%-34s %12s %12s %8s\n' "" vkvm qemu "vkvm/qemu"
printf '%-34s %12s %12s %8s\n' "PIO round trip, ring 3 (cycles)" "$vpm" "$qpm" "$(awk -v a="$vpm" -v b="$qpm" 'BEGIN{printf "%.2f", a/b}')"
printf '%-34s %12s %12s %8s\n' "PIO round trip, ring 3 (us)" "$(awk -v a="$vpm" -v k="$khz" 'BEGIN{printf "%.1f", a*1000/k}')" "$(awk -v a="$qpm" -v k="$khz" 'BEGIN{printf "%.1f", a*1000/k}')" ""
printf '%-34s %12s %12s %8s\n' "boot: start to guest exit (us)" "$vbm" "$qbm" "$(awk -v a="$vbm" -v b="$qbm" 'BEGIN{printf "%.2f", a/b}')"
