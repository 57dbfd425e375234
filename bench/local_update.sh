#!/usr/bin/env bash
# The pause of a local update (`faultline migrate --local`: the guest moves
# to a new VMM process on this host, its memfd RAM passed by descriptor)
# for 1, 2 and 4 GiB guests, against a loopback pre-copy and a post-copy
# migration of the same guest, measured in the same run. Each guest has 2
# vCPUs writing random pages at 64 MiB/s (after filling their memory) when
# it moves; every destination runs the workload to the end and verifies
# every page (a run whose guest does not verify is reported as such).
# Goal: the local update's pause <= 5 ms, and not growing with memory.
# Also printed: each move's total time (migrate --json elapsed_ms: from the
# command to completion) and the bytes it sent (for a local update: the
# vCPU and device state; for the migrations: guest memory).
# Usage: [ACCEL=tcg] bench/local_update.sh [path/to/faultline] [sizes...]
#        (default build/release/tools/faultline, sizes 1G 2G 4G; ACCEL is
#        passed to every `faultline run --accel`, default auto)
set -euo pipefail
cd "$(dirname "$0")/.."
cli=${1:-build/release/tools/faultline}
shift || true
sizes=("$@")
accel=${ACCEL:-auto}
[ ${#sizes[@]} -gt 0 ] || sizes=(1G 2G 4G)
dir=$(mktemp -d /tmp/faultline-local-bench.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT

# Waits until `file` contains `text` (at most 120 s).
await() {
  local file=$1 text=$2
  for _ in $(seq 1200); do
    grep -q -- "$text" "$file" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "timed out waiting for '$text' in $file" >&2
  cat "$file" >&2
  return 1
}

# Waits until both vCPUs finished their fill (query-status reports it).
await_random() {
  local control=$1
  for _ in $(seq 1200); do
    local n
    n=$("$cli" query --control "$control" query-status 2>/dev/null | grep -o '"phase":"fill"' |
        wc -l || true)
    [ "$n" -ge 2 ] && return 0
    sleep 0.1
  done
  echo "the guest never finished its fill" >&2
  return 1
}

# Seconds of random writes: long enough for a loopback pre-copy of `mem` to
# converge on these 2 cores (~180 MiB/s while both vCPUs write), so that
# every kind moves a guest that is still writing.
duration() {
  case $1 in
    *G) echo $((${1%G} * 15 + 10)) ;;
    *) echo 25 ;;  # under 1 GiB
  esac
}

# One move of a `mem` guest: kind local, precopy or postcopy. Prints the
# pause in microseconds and whether the destination's guest verified.
move() {
  local mem=$1 kind=$2
  local control=$dir/control.sock dest_err=$dir/dest.err dest_out=$dir/dest.out
  rm -f "$control"
  local to dest_args=()
  case $kind in
    local) to=unix:$dir/update.sock; dest_args=(--incoming "$to") ;;
    precopy) dest_args=(--incoming tcp:127.0.0.1:0) ;;
    postcopy) dest_args=(--incoming tcp:127.0.0.1:0 --postcopy) ;;
  esac
  "$cli" run --accel "$accel" "${dest_args[@]}" --mem "$mem" --vcpus 2 --backing memfd --json --quiet \
    --timeout 600 >"$dest_out" 2>"$dest_err" &
  local dest=$!
  pids+=("$dest")
  await "$dest_err" "waiting for a"
  if [ "$kind" != local ]; then
    to=$(grep -o 'tcp:127.0.0.1:[0-9]*' "$dest_err" | head -1)
  fi
  "$cli" run --accel "$accel" --control "$control" --mem "$mem" --vcpus 2 --backing memfd \
    --workload random,rate=64 --duration "$(duration "$mem")" --json --quiet --timeout 600 \
    >"$dir/src.out" 2>"$dir/src.err" &
  local src=$!
  pids+=("$src")
  await_random "$control"
  local args=(--control "$control" --to "$to" --json)
  [ "$kind" = local ] && args+=(--local)
  [ "$kind" = postcopy ] && args+=(--mode postcopy)
  local m
  if ! m=$("$cli" migrate "${args[@]}"); then
    echo "$mem $kind: the migration failed; the source said:" >&2
    tail -5 "$dir/src.err" >&2
    return 1
  fi
  wait "$src" || true
  # The local update's pause in parts, as the source VMM reports it.
  local parts
  parts=$(grep -o 'vCPUs out in [0-9]* us, state saved and sent in [0-9]* us, loaded and confirmed by the new process in [0-9]* us' "$dir/src.err" || true)
  local verified=no
  if wait "$dest" && grep -q '"success":true' "$dest_out" && grep -q '"bad_pages":0' "$dest_out"; then
    verified=yes
  fi
  local us ms
  us=$(grep -o '"downtime_us":[0-9]*' <<<"$m" | head -1 | cut -d: -f2 || true)
  ms=$(grep -o '"downtime_ms":[0-9]*' <<<"$m" | head -1 | cut -d: -f2 || true)
  [ -n "$us" ] || us=$((ms * 1000))  # an older build: milliseconds only
  local elapsed sent
  elapsed=$(grep -o '"elapsed_ms":[0-9.]*' <<<"$m" | tail -1 | cut -d: -f2)
  sent=$(grep -o '"bytes_sent":[0-9]*' <<<"$m" | head -1 | cut -d: -f2)
  awk -v mem="$mem" -v kind="$kind" -v us="$us" -v ok="$verified" -v ms="$elapsed" -v b="$sent" \
    'BEGIN { printf "%-5s %-9s pause %8.2f ms  total %8.1f ms  sent %12.1f KiB  verified %s\n",
             mem, kind, us / 1000, ms, b / 1024, ok }'
  [ -z "$parts" ] || echo "      ($parts)"
}

echo "# accel $accel; pause: local update vs loopback pre-copy and post-copy (downtime_us)"
for mem in "${sizes[@]}"; do
  for kind in local precopy postcopy; do
    move "$mem" "$kind"
  done
done
