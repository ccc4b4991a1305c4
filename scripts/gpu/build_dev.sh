# Sourced by the single-GPU scripts (run_e2e.sh, run_packed.sh): records the card and the time in
# $OUT/gpu.txt, builds the given targets in build-dev with CUDA from the carried build-gpu-deps, and runs
# test binaries with a summary line each. Needs OUT set; exits the script on a failed configure or build.
build_dev() {  # targets...
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
  date -u +"%Y-%m-%dT%H:%MZ" | tee -a "$OUT/gpu.txt"
  local t0
  t0=$(date +%s)
  cmake -S . -B build-dev -G Ninja -DCMAKE_BUILD_TYPE=Release -DSHARDLM_CUDA=ON -DSHARDLM_BENCH=OFF \
    -DSHARDLM_MPI=${SHARDLM_MPI:-OFF} -DSHARDLM_DEPS_DIR="$PWD/build-gpu-deps" >"$OUT/cmake.log" 2>&1 || { tail -30 "$OUT/cmake.log"; exit 1; }
  ninja -C build-dev -j16 "$@" >"$OUT/build.log" 2>&1 || { grep -E "error" -A3 "$OUT/build.log" | head -60; exit 1; }
  echo "build: $(( $(date +%s) - t0 )) s"
}

run_tests() {  # test binaries...
  local t
  for t in "$@"; do
    timeout 300 "$t" >"$OUT/$(basename "$t").log" 2>&1; echo "$(basename "$t") rc=$?"
    grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|Expected|Which is|worst|diverged" "$OUT/$(basename "$t").log" | head -30
  done
}
