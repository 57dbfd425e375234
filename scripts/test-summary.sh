#!/usr/bin/env bash
# Prints, from CTest's JUnit file, how many tests ran per accelerator (the
# integration suite's tcg/ and kvm/ prefixes; unit tests apart) and how many
# were skipped, with each distinct reason.
set -euo pipefail
junit=${1:?usage: test-summary.sh CTEST_JUNIT_XML}
[ -f "$junit" ] || { echo "test-summary: no $junit" >&2; exit 1; }
echo "== tests per accelerator =="
grep -o '<testcase name="[^"]*"[^>]*status="[a-z]*"' "$junit" |
  sed -E 's/<testcase name="([^"]*)".*status="([a-z]*)"/\1 \2/' |
  awk '{ split($1, p, "/"); group = (p[1] == "tcg" || p[1] == "kvm") ? p[1] : "unit";
         n[group]++; s[group, $NF]++ }  # names may hold spaces: the status is last
       END { for (g in n) printf "  %-5s %4d tests: %d passed, %d failed, %d skipped\n", g, n[g],
             s[g, "run"], s[g, "fail"], s[g, "notrun"] + s[g, "disabled"] }' | sort
skipped=$(grep -c 'status="notrun"' "$junit" || true)
echo "== skipped: $skipped =="
if [ "$skipped" -gt 0 ]; then
  # GoogleTest prints "file:line: Skipped" and the reason on the next line.
  sed 's/&#10;/\n/g' "$junit" |
    awk '/: Skipped *$/ { if ((getline reason) > 0) { sub(/ \(this run is on [a-z]+\)/, "", reason); print reason } }' |
    sort | uniq -c | sort -rn | sed 's/^/  /'
fi
