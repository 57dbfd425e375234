#!/usr/bin/env bash
# Builds Faultline without sanitizers, installs it into a prefix, builds
# examples/ against that prefix alone (CMake package, and the C example a
# second time with pkg-config) and runs them. Each example migrates between
# two processes and exits 0 only if the memory arrived intact.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${FAULTLINE_EXAMPLES_BUILD:-build/install}
prefix=$(realpath -m "$build/prefix")
cmake -S . -B "$build/lib" -G Ninja -DCMAKE_BUILD_TYPE=Release -DFAULTLINE_WERROR=ON >/dev/null
# What the embedding API needs, and the benchmarks (built nowhere else in
# CI; they print figures and run no test).
bench_targets=$(sed -n 's/^add_executable(\(faultline_bench_[a-z_]*\) .*/\1/p' bench/CMakeLists.txt)
# shellcheck disable=SC2086
cmake --build "$build/lib" --target faultline_embed $bench_targets
rm -rf "$prefix"
cmake --install "$build/lib" --prefix "$prefix" >/dev/null
if find "$prefix/include" -name '*.h' -print0 | xargs -0 grep -lE '#include "src/|#include <linux/'; then
  echo "examples: an installed header includes src/ or <linux/*.h>" >&2
  exit 1
fi
cmake -S examples -B "$build/examples" -G Ninja -DCMAKE_PREFIX_PATH="$prefix" \
  -DCMAKE_BUILD_TYPE=Release -DCMAKE_C_FLAGS="-Wall -Wextra -Werror" \
  -DCMAKE_CXX_FLAGS="-Wall -Wextra -Werror" >/dev/null
cmake --build "$build/examples"
# The C example once more, with pkg-config and the C compiler alone.
PKG_CONFIG_PATH="$prefix/lib/pkgconfig" \
  cc -std=c11 -Wall -Wextra -Werror examples/precopy.c -o "$build/examples/precopy_pkgconfig" \
  $(PKG_CONFIG_PATH="$prefix/lib/pkgconfig" pkg-config --cflags --libs faultline)
"$build/examples/postcopy_workers" 64
"$build/examples/precopy" 64
"$build/examples/precopy_pkgconfig" 32
echo "examples: built against $prefix and verified"
