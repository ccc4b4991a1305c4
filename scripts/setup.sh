#!/usr/bin/env bash
# Installs what shardlm needs on Debian 12 (as root) and builds it. Used by README.md and .ci/run.
#   scripts/setup.sh [build-dir] [extra cmake args...]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
shift || true
pkgs="build-essential cmake ninja-build libopenmpi-dev openmpi-bin nlohmann-json3-dev libcli11-dev libgtest-dev libgmock-dev libbenchmark-dev python3 libcpp-httplib-dev"
# `shardlm serve`'s end-to-end test drives it with the openai npm client (tests/serve/node): Node.js and npm,
# Debian's unless a Node.js is already installed.
command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || pkgs="$pkgs nodejs npm"
missing=""
for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  echo "setup: installing$missing"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@"
cmake --build "$build" -j"$(nproc)"
