#!/usr/bin/env bash
# Live-migration figures, through `faultline demo` (one process, two VMs,
# loopback TCP, the production engine and transport):
#   1. an idle 4 GiB guest (1 vCPU, held after its fill: PVM cannot halt a
#      vCPU at CPL3) with 1, 2 and 4 page channels, destination RAM
#      preallocated (and once without): total migration time against the
#      time the bytes actually sent take at the loopback TCP rate measured in
#      the same run, before and after the migration (--tcp-baseline; goal:
#      total <= 1.25x); also CPU time per GiB against loopback TCP's, which
#      other jobs on the machine disturb less than wall time;
#   2. the switchover pause of the default demo: 2 GiB, 2 vCPUs writing
#      random pages at 64 MiB/s.
# Usage: bench/migration.sh [path/to/faultline]   (default build/release)
set -euo pipefail
cd "$(dirname "$0")/.."
cli=${1:-build/release/tools/faultline}
# Prints each run's JSON report (demo --json), one line each.
idle() {
  "$cli" demo --idle --mem 4G --vcpus 1 --after 0 --tcp-baseline --json "$@"
}
for channels in 1 2 4; do
  idle --channels "$channels" --prealloc
done
idle --channels 1
for run in 1 2 3; do
  "$cli" demo --mem 2G --vcpus 2 --json
done
