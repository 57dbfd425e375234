#!/usr/bin/env bash
# Clang's thread-safety analysis of the lock annotations (src/sys/mutex.h):
# every C++ source, tests included, through clang-19's front end with
# -Wthread-safety and -Werror (FAULTLINE_THREAD_SAFETY=ON). The analysis is
# part of semantic analysis, so each file is compiled with -fsyntax-only
# from the compile commands of a configured (not built) tree: no code
# generation, no linking, a fraction of a build's time. Fails on any member
# touched without the lock that guards it, any REQUIRES function called
# without its lock, and any clang warning. With FAULTLINE_TSA_DONE_IN set to
# a build that compiled files with the same analysis (scripts/fuzz.sh's,
# as .ci/run does), those files are not checked again.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
build=${FAULTLINE_CLANG_BUILD:-build/clang}
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG=-O0 \
  -DCMAKE_C_COMPILER=clang-19 -DCMAKE_CXX_COMPILER=clang++-19 -DFAULTLINE_WERROR=ON \
  -DFAULTLINE_THREAD_SAFETY=ON -DCMAKE_EXPORT_COMPILE_COMMANDS=ON >/dev/null
python3 scripts/syntax_check.py "$build/compile_commands.json" "$(nproc)" \
  ${FAULTLINE_TSA_DONE_IN:+"$FAULTLINE_TSA_DONE_IN"}
echo "thread-safety: clang-19 -Wthread-safety analysis of every C++ file in $build is clean"
