#!/usr/bin/env bash
# The main job: build Faultline (release) and live-migrate a running guest.
# A source VM (2 vCPUs, 2 GiB) runs the test guest, which fills its memory
# and writes random pages at 64 MiB/s with a ledger; a destination VM waits
# on loopback TCP; post-copy (one pre-copy pass, then the guest runs on the
# destination at once, its missing pages fetched on fault and pushed in the
# background) moves the guest while it writes; the guest keeps running on
# the destination and verifies every page there. Prints total time,
# switchover pause, bytes sent, passes, pages demanded and pushed, fault
# latency p50/p99, blocked time, pages verified, wrong pages.
# Extra arguments go to `faultline demo` (--json, --backing memfd, --mem 4G,
# --vcpus N, --channels N, --mode postcopy|precopy, --tcp-baseline, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh >&2
build=${FAULTLINE_BUILD:-build/release}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
# Build progress to stderr: stdout is the demo's (JSON with --json).
cmake --build "$build" --target faultline_cli >&2
exec "$build/tools/faultline" demo "$@"
