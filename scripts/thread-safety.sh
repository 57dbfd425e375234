#!/usr/bin/env bash
# Clang's thread-safety analysis of the lock annotations (src/sys/mutex.h):
# builds everything, tests included, with clang-19, -Wthread-safety and
# -Werror (FAULTLINE_THREAD_SAFETY=ON). No sanitizers and -O0 without debug
# information: the analysis needs compilation, nothing else, and this keeps
# the build short. Fails on any member touched without the lock that guards
# it, any REQUIRES function called without its lock, and any clang warning.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
build=${FAULTLINE_CLANG_BUILD:-build/clang}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG=-O0 \
  -DCMAKE_C_COMPILER=clang-19 -DCMAKE_CXX_COMPILER=clang++-19 -DFAULTLINE_WERROR=ON \
  -DFAULTLINE_THREAD_SAFETY=ON >/dev/null
cmake --build "$build" "$@"
echo "thread-safety: clang-19 -Wthread-safety build of $build is clean"
