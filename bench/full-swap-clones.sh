#!/usr/bin/env bash
# Full swap shared by clones (issue 11): every run must end with status 3,
# one line naming the full swap, within 30 s. The swap is set to 512M (the
# old default, twice one VM's RAM); the default now scales with --clones and
# this workload then fits.
#   bench/full-swap-clones.sh [RUNS] [vkvm run options...]
# Prints one line per run (status, seconds, stderr lines) and a summary;
# exits 1 if any run missed.
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${1:-20}
shift || true
args=("$@")
[ ${#args[@]} -eq 0 ] && args=(--clones 4 --phys-mem 4M --swap-size 512M --cmdline tests=cow-clone,write-verify)
bin=target/release/vkvm
[ -x "$bin" ] || cargo build --release -q
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
bad=0
times=()
for i in $(seq 1 "$runs"); do
  t0=$(date +%s.%N)
  "$bin" run "${args[@]}" --timeout 120 >"$tmp/out" 2>"$tmp/err"
  rc=$?
  t=$(echo "$(date +%s.%N) - $t0" | bc)
  lines=$(wc -l <"$tmp/err")
  full=$(grep -c "swap is full" "$tmp/err")
  ok=yes
  if [ "$rc" -ne 3 ] || [ "$full" -ne 1 ] || [ "$(echo "$t > 30" | bc)" -eq 1 ]; then ok=no; bad=$((bad + 1)); fi
  times+=("$t")
  printf 'run %2d: status %d, %5.1f s, %d stderr lines, swap-full line: %d, ok: %s\n' "$i" "$rc" "$t" "$lines" "$full" "$ok"
  [ "$ok" = no ] && tail -3 "$tmp/err"
done
printf '%s\n' "${times[@]}" | sort -n | awk -v bad="$bad" -v n="$runs" \
  '{a[NR]=$1} END {printf "%d/%d runs ok; seconds min %.1f median %.1f max %.1f\n", n-bad, n, a[1], a[int((NR+1)/2)], a[NR]}'
[ "$bad" -eq 0 ]
