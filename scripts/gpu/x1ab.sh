#!/usr/bin/env bash
# A/B of packed-matvec variants end to end on one GPU: builds shardlm (and the matvec bench), then for each
# type in TYPES (default q4_0 q8_0 q4_k_m) generates the 8B file and runs `bench -p 0 -n 128 -r 3` once per
# SHARDLM_PK_VARIANT in VARIANTS (default "0 3"), plus the matvec micro-bench per variant.
#   run: bash scripts/gpu/x1ab.sh    (carry: build-gpu-deps)
set -uo pipefail
OUT=${OUT:-/tmp/o}
mkdir -p "$OUT"
source scripts/gpu/build_dev.sh
build_dev shardlm shardlm_cuda_bench test_cuda_ops
[ "${TESTS:-0}" = 1 ] && run_tests build-dev/tests/cuda/test_cuda_ops
bench=build-dev/src/backends/cuda/shardlm_cuda_bench
bin=build-dev/apps/shardlm/shardlm
for v in ${VARIANTS:-0 3}; do SHARDLM_PK_VARIANT=$v $bench --matvec-only --quick --types ${MV_TYPES:-q4_0,q8_0,q4_k,q6_k} 2>&1 | grep -E "^q" | sed "s/^/v$v /"; done
envs=""
for v in ${VARIANTS:-0 3}; do envs="$envs SHARDLM_PK_VARIANT=$v"; done
NO_BUILD=1 TYPES="${TYPES:-q4_0 q8_0 q4_k_m}" ENVS="$envs" bash scripts/gpu/x1env.sh
if [ "${NCU_E2E:-0}" = 1 ]; then
  # Per-kernel DRAM throughput inside real Q4_0 decode steps (ncu serializes kernels: no PDL overlap).
  $bin gen-model --arch llama-3.1-8b --type q4_0 -o /tmp/m.gguf -q || exit 1
  timeout 200 ncu --kernel-name regex:"matvec_pipe|rms_norm|swiglu|attention|rope" --launch-skip 2000 --launch-count 40 \
    --section SpeedOfLight $bin bench --backend cuda -m /tmp/m.gguf -p 0 -n 16 -r 1 -q --kv-type f16 >"$OUT/ncu-e2e.txt" 2>&1
  echo "ncu e2e rc=$?"
  python3 - "$OUT/ncu-e2e.txt" <<'PY'
import re, sys
name = None; grid = None; dram = "?"; rows = []
for line in open(sys.argv[1]):
    m = re.search(r"(\w+_kernel)\b.*\((\d+), (\d+), (\d+)\)x\((\d+), (\d+), (\d+)\)", line)
    if m: name = m.group(1); grid = m.group(2) + "x" + m.group(5); continue
    m = re.search(r"DRAM Throughput\s+%\s+([0-9.]+)", line)
    if m: dram = m.group(1); continue
    m = re.search(r"^\s+Duration\s+(\S+)\s+([0-9.]+)", line)
    if m and name: rows.append((name, grid, m.group(2) + " " + m.group(1), dram)); name = None
for r in rows: print("%-28s %-10s %12s  DRAM %s%%" % r)
PY
  rm -f /tmp/m.gguf
fi
