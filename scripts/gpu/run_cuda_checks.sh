#!/usr/bin/env bash
# Builds the CUDA backend standalone (scripts/gpu/CMakeLists.txt), runs its op suite and its bench, on a
# lent GPU machine. Needs the googletest sources in build-gpu-deps/googletest (carried; copy of
# /usr/src/googletest from a Debian dev machine). Logs go to $OUT (the device tool brings them back).
#   run: bash scripts/gpu/run_cuda_checks.sh [bench args, e.g. --quick]   (carry: build-gpu-deps)
set -uo pipefail
OUT=${OUT:-/tmp/shardlm-gpu-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv,noheader | tee "$OUT/gpu.txt"
date -u +"%Y-%m-%dT%H:%MZ" | tee -a "$OUT/gpu.txt"
t0=$(date +%s)
cmake -S scripts/gpu -B build-gpu -G Ninja -DGTEST_SRC="$PWD/build-gpu-deps/googletest" >"$OUT/cmake.log" 2>&1 \
  || { tail -30 "$OUT/cmake.log"; exit 1; }
ninja -C build-gpu -j16 >"$OUT/build.log" 2>&1 || { grep -E "error" -A3 "$OUT/build.log" | head -60; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  ./build-gpu/tests_cuda/test_cuda_ops ${GTEST_ARGS:-} >"$OUT/test.log" 2>&1
  echo "tests rc=$?"
  grep -E "^\[  (FAILED|PASSED|SKIPPED) |^\[       OK|Failure|worst|Expected|Which is|error" "$OUT/test.log" | head -120
fi
./build-gpu/backend_cuda/shardlm_cuda_bench "$@" 2>&1 | tee "$OUT/bench.log"
