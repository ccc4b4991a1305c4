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
for ty in ${TYPES:-q4_0 q8_0 q4_k_m}; do
  $bin gen-model --arch llama-3.1-8b --type $ty -o /tmp/m.gguf -q || exit 1
  for v in ${VARIANTS:-0 3}; do
    SHARDLM_PK_VARIANT=$v $bin bench --backend cuda -m /tmp/m.gguf -p 0 -n 128 -r 3 -q --kv-type f16 --json >"$OUT/ab.json" 2>&1
    python3 -c "import json;d=json.load(open('$OUT/ab.json'));print('$ty v$v tg128 %.1f share %.1f%% fixed %.0f us' % (d['tg']['tokens_per_s'],100*d['tg']['roofline_share'],d['tg']['fixed_cost_us_per_token']))" || tail -3 "$OUT/ab.json"
  done
  rm -f /tmp/m.gguf
done
