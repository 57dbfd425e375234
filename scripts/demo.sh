#!/usr/bin/env bash
# The main job: build Faultline (release) and run the test guest on /dev/kvm
# with 2 vCPUs and 1 GiB: it fills its memory, writes random pages at
# 64 MiB/s for 3 seconds while keeping a ledger, then verifies every page
# and reports. Extra arguments go to `faultline run` (e.g. --json).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
build=${FAULTLINE_BUILD:-build/release}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build "$build" --target faultline_cli
exec "$build/tools/faultline" run --mem 1G --vcpus 2 --workload random,rate=64 --duration 3 "$@"
