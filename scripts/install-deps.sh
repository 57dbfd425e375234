#!/usr/bin/env bash
# Installs the Debian packages Faultline needs, only those that are missing.
# Run as root on a fresh machine; a machine that has them all is left alone.
set -euo pipefail

packages=(
  cmake ninja-build g++ binutils
  libgtest-dev libgmock-dev libbenchmark-dev
  libfmt-dev libcli11-dev nlohmann-json3-dev libssl-dev libunicorn-dev pkg-config
  qemu-system-x86 valgrind clang-format
  iproute2  # ip and tc: the two-namespace tests (tests/integration/netns_test.cc)
  python3  # scripts/check_layers.py and its test (ctest -L layering)
  clang-19  # the thread-safety analysis (scripts/thread-safety.sh, ctest -L thread-safety)
  libclang-rt-19-dev  # libFuzzer (scripts/fuzz.sh)
)

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing packages: ${missing[*]}" >&2
  echo "install-deps: run this script as root (it uses apt-get) or install them yourself" >&2
  exit 1
fi

echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
