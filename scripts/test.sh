#!/usr/bin/env bash
# The test command (README.md and .ci/run): builds if needed, then runs every test with CTest.
#   scripts/test.sh [build-dir] [extra ctest arguments, e.g. -E REGEX]
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
shift || true
[ -f "$build/build.ninja" ] || scripts/setup.sh "$build"
cmake --build "$build" -j"$(nproc)"
# MPI tests start real ranks; as root OpenMPI needs these, and more ranks than cores need oversubscription.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
ctest --test-dir "$build" --output-on-failure -j"$(nproc)" --timeout 900 "$@"
