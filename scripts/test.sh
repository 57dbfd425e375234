#!/usr/bin/env bash
# Builds everything with -Werror under AddressSanitizer and UBSan and runs
# every test: unit, and integration once per accelerator the machine has
# (the software CPU always, KVM where /dev/kvm exists). Ends with the counts
# per accelerator and the skipped tests with their reasons.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
build=${FAULTLINE_TEST_BUILD:-build/test}
# -g1 (line tables): reports still name function, file and line, and the
# build takes 40% less time than with full debug information.
# No benchmarks here (they run no test): scripts/examples.sh builds them.
# Test code at -O0 compiles in about half the time; the code it tests is
# built at -O1.
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Debug -DFAULTLINE_WERROR=ON \
  -DFAULTLINE_SANITIZE=ON -DFAULTLINE_BENCH=OFF -DCMAKE_CXX_FLAGS_DEBUG="-O1 -g1" \
  -DFAULTLINE_TEST_CXX_FLAGS=-O0 >/dev/null
cmake --build "$build"
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
junit="$build/ctest-results.xml"
status=0
ctest --test-dir "$build" --output-on-failure -j2 --output-junit "$(realpath "$build")/ctest-results.xml" "$@" || status=$?
scripts/test-summary.sh "$junit" || true
exit $status
