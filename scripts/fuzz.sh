#!/usr/bin/env bash
# Builds the libFuzzer targets (tests/fuzz/) with clang-19, AddressSanitizer
# and UBSan (and the thread-safety analysis as errors, so that
# scripts/thread-safety.sh can skip what this build compiled), and runs each
# for SECONDS (default 60), as many at once as
# there are CPUs, from its seed corpus in
# tests/fuzz/corpus/<name>/. New inputs go to a scratch copy of the corpus,
# not the repository's. Fails on any crash, sanitizer report or broken
# property; the input that did it is left in $build/crashes/<name>/ and its
# path is printed, for a regression test.
#
#   scripts/fuzz.sh [SECONDS] [NAME...]      (FAULTLINE_FUZZ_BUILD=build/fuzz)
#   scripts/fuzz.sh 0 wire_receiver          # just the build and the corpus
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
seconds=${1:-60}
shift || true
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(wire_receiver control_json snapshot_manifest uffd_handshake)
build=${FAULTLINE_FUZZ_BUILD:-build/fuzz}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG="-O1 -g1" \
  -DCMAKE_C_COMPILER=clang-19 -DCMAKE_CXX_COMPILER=clang++-19 -DFAULTLINE_WERROR=ON \
  -DFAULTLINE_SANITIZE=ON -DFAULTLINE_FUZZ=ON -DFAULTLINE_THREAD_SAFETY=ON >/dev/null
cmake --build "$build" --target faultline_fuzzers
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
# One target per CPU at a time (a libFuzzer run is single-threaded).
run_one() {
  local name=$1 corpus="$build/corpus/$1" crashes="$build/crashes/$1" log="$build/fuzz-$1.log"
  rm -rf "$corpus" && mkdir -p "$corpus" "$crashes"
  cp tests/fuzz/corpus/"$name"/* "$corpus"/
  local args
  if [ "$seconds" = 0 ]; then
    args=(-runs=0 tests/fuzz/corpus/"$name")  # every seed once
  else
    args=(-max_total_time="$seconds" -max_len=65536 -timeout=10 -rss_limit_mb=2048 "$corpus")
  fi
  if "$build/tests/fuzz/faultline_fuzz_$name" -artifact_prefix="$crashes/" "${args[@]}" >"$log" 2>&1; then
    echo "fuzz $name: ok ($(grep -E '^#[0-9]+.*(DONE|INITED)' "$log" | tail -1 || true))"
  else
    echo "fuzz $name: FAILED; the input is in $crashes/, the log in $log:"
    tail -30 "$log"
    return 1
  fi
}
status=0
jobs=$(nproc)
running=0
for name in "${names[@]}"; do
  if [ "$running" -ge "$jobs" ]; then
    wait -n || status=1
    running=$((running - 1))
  fi
  run_one "$name" &
  running=$((running + 1))
done
while [ "$running" -gt 0 ]; do
  wait -n || status=1
  running=$((running - 1))
done
exit $status
