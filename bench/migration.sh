#!/usr/bin/env bash
# Live-migration figures, through `faultline demo` (one process, two VMs,
# loopback TCP, the production engine and transport):
#   1. an idle 4 GiB guest (1 vCPU, 1 MiB/s of writes after its fill) with
#      1, 2 and 4 page channels: total migration time against the time the
#      bytes actually sent take at the loopback TCP rate measured in the same
#      run (--tcp-baseline; goal: total <= 1.25x);
#   2. the switchover pause of the default demo: 2 GiB, 2 vCPUs writing
#      random pages at 64 MiB/s.
# Usage: bench/migration.sh [path/to/faultline]   (default build/release)
set -euo pipefail
cd "$(dirname "$0")/.."
cli=${1:-build/release/tools/faultline}
for channels in 1 2 4; do
  "$cli" demo --idle --mem 4G --vcpus 1 --channels "$channels" --after 0 --tcp-baseline --json |
    python3 -c '
import json, sys
j = json.loads(sys.stdin.read())
print(f"idle 4 GiB, {j[\"channels\"]} channel(s): total {j[\"total_ms\"]:.0f} ms, "
      f"{j[\"bytes_sent\"]/2**20:.0f} MiB sent, loopback {j[\"tcp_loopback_bytes_per_sec\"]/2**20:.0f} MiB/s "
      f"-> bytes alone {j[\"wire_time_ms\"]:.0f} ms; total/wire = {j[\"total_over_wire_time\"]:.2f}x; "
      f"pause {j[\"switchover_pause_ms\"]:.1f} ms, {j[\"passes\"]} passes, bad pages {j[\"bad_pages\"]}")'
done
for run in 1 2 3; do
  "$cli" demo --mem 2G --vcpus 2 --json |
    python3 -c '
import json, sys
j = json.loads(sys.stdin.read())
print(f"2 GiB, 2 vCPUs at 64 MiB/s: switchover pause {j[\"switchover_pause_ms\"]:.1f} ms "
      f"(engine downtime {j[\"engine_downtime_ms\"]} ms), total {j[\"total_ms\"]:.0f} ms, "
      f"{j[\"passes\"]} passes, {j[\"pages_verified\"]} pages verified, bad {j[\"bad_pages\"]}")'
done
