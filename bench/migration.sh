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
idle() {
  "$cli" demo --idle --mem 4G --vcpus 1 --after 0 --tcp-baseline --json "$@" |
    python3 -c '
import json, sys
j = json.loads(sys.stdin.read())
runs = "/".join(f"{r/2**20:.0f}" for r in j["tcp_loopback_runs_bytes_per_sec"])
print(f"idle 4 GiB, {j[\"channels\"]} channel(s), prealloc {j[\"prealloc\"]}: total {j[\"total_ms\"]:.0f} ms, "
      f"{j[\"bytes_sent\"]/2**20:.0f} MiB sent; loopback {runs} MiB/s (before/after) "
      f"-> bytes alone {j[\"wire_time_ms\"]:.0f} ms; total/wire = {j[\"total_over_wire_time\"]:.2f}x; "
      f"CPU/GiB {j[\"migration_cpu_ms_per_gib\"]:.0f} vs {j[\"tcp_loopback_cpu_ms_per_gib\"]:.0f} ms "
      f"({j[\"cpu_over_loopback_cpu\"]:.2f}x); pause {j[\"switchover_pause_ms\"]:.1f} ms; bad pages {j[\"bad_pages\"]}")'
}
for channels in 1 2 4; do
  idle --channels "$channels" --prealloc
done
idle --channels 1
for run in 1 2 3; do
  "$cli" demo --mem 2G --vcpus 2 --json |
    python3 -c '
import json, sys
j = json.loads(sys.stdin.read())
print(f"2 GiB, 2 vCPUs at 64 MiB/s: switchover pause {j[\"switchover_pause_ms\"]:.1f} ms "
      f"(engine downtime {j[\"engine_downtime_ms\"]} ms), total {j[\"total_ms\"]:.0f} ms, "
      f"{j[\"passes\"]} passes, {j[\"pages_verified\"]} pages verified, bad {j[\"bad_pages\"]}")'
done
