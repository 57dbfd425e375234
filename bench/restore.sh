#!/usr/bin/env bash
# Restores of one snapshot, eager, lazy, and lazy with the working set
# prefetched, measured in the same run: the time to the guest's first
# instruction, to the end of its post-restore hot-set phase (its report),
# and until every page is resident, all from the start of the restore
# (`faultline run --restore ... --json`, "restore"). Also the demand
# fetches (faults that had to read the snapshot).
#
# The guest (2 vCPUs) fills SIZE of memory, writes random pages at 64 MiB/s
# and is snapshotted live while it does; each restore tells it to stop
# (--guest-stop), so it goes on to a hot-set phase (HOT_PAGES pages, every
# HOT_STRIDE-th one, HOT_OPS writes), then verifies every page (a restore
# whose guest does not verify fails the script). The working set comes from
# one lazy restore with --record-ws.
#
# Goal (issue 13): lazy + prefetch ends the hot-set phase >= 3x sooner than
# lazy, and sooner than eager.
# Usage: [ACCEL=tcg] [ROUNDS=3] [DROP_CACHES=1] [INSTALLER=copy]
#        bench/restore.sh [path/to/faultline] [SIZE]
#        (default build/release/tools/faultline, 1G; DROP_CACHES=1 drops the
#        page cache before each restore, as root: a cold snapshot)
set -euo pipefail
cd "$(dirname "$0")/.."
cli=${1:-build/release/tools/faultline}
size=${2:-1G}
accel=${ACCEL:-auto}
rounds=${ROUNDS:-3}
installer=${INSTALLER:-copy}
hot="hot_pages=${HOT_PAGES:-16384},hot_stride=${HOT_STRIDE:-16},hot_ops=${HOT_OPS:-32768}"
dir=$(mktemp -d /tmp/faultline-restore-bench.XXXXXX)
src_pid=
cleanup() {
  [ -n "$src_pid" ] && kill -9 "$src_pid" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

"$cli" run --accel "$accel" --mem "$size" --vcpus 2 --control "$dir/src.sock" --quiet --json \
  --timeout 600 --workload "random-hotset,rate=64,$hot" >"$dir/src.out" 2>"$dir/src.err" &
src_pid=$!
# The fill has ended on both vCPUs: random writes under way.
for _ in $(seq 1200); do
  s=$("$cli" query --control "$dir/src.sock" query-status 2>/dev/null || true)
  [ "$(echo "$s" | python3 -c 'import json,sys
try: g=json.load(sys.stdin)["guest"]
except Exception: g=[]
print(int(len(g)==2 and all(v["phase"]=="fill" for v in g)))' 2>/dev/null)" = 1 ] && break
  sleep 0.1
done
"$cli" snapshot --control "$dir/src.sock" --to "$dir/snap"
kill -9 "$src_pid"; src_pid=

restore() {  # name, extra args...
  local name=$1; shift
  [ "${DROP_CACHES:-0}" = 1 ] && { sync; echo 3 >/proc/sys/vm/drop_caches; }
  "$cli" run --restore "$dir/snap" --accel "$accel" --guest-stop --json --quiet "$@" \
    >"$dir/$name.json" 2>"$dir/$name.err" || { cat "$dir/$name.err" >&2; exit 1; }
  python3 - "$dir/$name.json" "$name" >>"$dir/results" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
if not j["success"] or j["bad_pages"]:
    sys.exit(f"{sys.argv[2]}: the guest did not verify: {j}")
r = j["restore"]
print(json.dumps({"mode": sys.argv[2], "first": r.get("first_instruction_ms"),
                  "hot": r.get("hotset_done_ms"), "resident": r.get("resident_ms"),
                  "demand": r.get("demand_fetches", 0), "pages": j["pages_verified"]}))
PY
}

restore record --lazy --installer "$installer" --record-ws "$dir/ws"
for _ in $(seq "$rounds"); do
  restore eager
  restore lazy --lazy --installer "$installer"
  restore prefetch --lazy --installer "$installer" --prefetch "$dir/ws"
done

python3 - "$dir/results" "$size" "$accel" "$rounds" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(mode, key):
    v = [r[key] for r in rows if r["mode"] == mode and r[key] is not None]
    return statistics.median(v) if v else float("nan")
print(f"restore of a {sys.argv[2]} guest ({sys.argv[3]}), medians of {sys.argv[4]} rounds, ms from the restore's start")
print(f"{'mode':10} {'first instr':>12} {'hot-set end':>12} {'resident':>10} {'demand fetches':>15}")
for m in ("record", "eager", "lazy", "prefetch"):
    print(f"{m:10} {med(m,'first'):12.1f} {med(m,'hot'):12.1f} {med(m,'resident'):10.1f} {med(m,'demand'):15.0f}")
print(f"hot-set end, lazy / lazy+prefetch: {med('lazy','hot')/med('prefetch','hot'):.2f}x (goal >= 3)")
print(f"hot-set end, eager / lazy+prefetch: {med('eager','hot')/med('prefetch','hot'):.2f}x (goal > 1)")
print(f"demand fetches, lazy+prefetch / recording run: {med('prefetch','demand')/max(1,med('record','demand')):.3f} (goal <= 0.10)")
PY
