#!/usr/bin/env bash
# On a lent GPU machine: the packed quantized matvec round. Builds the project with CUDA (carried
# build-gpu-deps), runs the pack/op/golden GPU tests, the matvec and decode-step benches with packed
# weights and, as the baseline in the same run, with ggml's layout (--no-pack); then, for each type given,
# bench on an 8B gen-model file.
#   run: bash scripts/gpu/run_packed.sh [e2e types, e.g. q4_0 q8_0 q4_k_m]   (carry: build-gpu-deps)
set -uo pipefail
OUT=${OUT:-/tmp/shardlm-gpu-out}
mkdir -p "$OUT"
source scripts/gpu/build_dev.sh
build_dev shardlm test_golden_cuda test_cuda_ops test_cuda_pack shardlm_cuda_bench
[ "${SKIP_TESTS:-0}" = 1 ] || run_tests build-dev/tests/cuda/test_cuda_pack build-dev/tests/cuda/test_cuda_ops build-dev/tests/model/test_golden_cuda
bench=build-dev/src/backends/cuda/shardlm_cuda_bench
if [ "${SKIP_MICRO:-0}" != 1 ]; then
  for v in ${PK_VARIANTS:-0}; do  # SHARDLM_PK_VARIANT: 0 = pipelined kernel, 1 = two-rows register kernel, 2 = pipelined, 2 rows (Q4_0)
    echo "-- packed matvec variant $v"
    SHARDLM_PK_VARIANT=$v $bench --matvec-only --quick --types q8_0,q4_0,q4_k,q6_k 2>&1 | tee "$OUT/matvec-packed-v$v.log" | grep -E "^(q|dev)"
  done
  [ "${NO_PACK_BASELINE:-1}" = 1 ] && $bench --matvec-only --quick --no-pack --types q8_0,q4_0,q4_k,q6_k 2>&1 | tee "$OUT/matvec-ggml.log" | grep -E "^(q|dev)"
  for v in ${PK_DECODE_VARIANTS:-0}; do
    SHARDLM_PK_VARIANT=$v $bench --decode-only --types ${DECODE_TYPES:-bf16,q8_0,q4_0,q4_k} 2>&1 | tee "$OUT/decode-packed-v$v.log" | grep -E "^decode" | sed "s/^/v$v /"
  done
fi
bin=build-dev/apps/shardlm/shardlm
for ty in "$@"; do
  $bin gen-model --arch llama-3.1-8b --type $ty -o /tmp/m.gguf -q || exit 1
  echo "== llama-3.1-8b $ty"
  for pack in 1 0; do
    SHARDLM_CUDA_PACK=$pack $bin bench --backend cuda -m /tmp/m.gguf -p 512 -n 128 -r 3 -q --kv-type f16 --json \
      >"$OUT/bench-$ty-pack$pack.json" 2>"$OUT/bench-$ty-pack$pack.err"
    python3 -c "import json;d=json.load(open('$OUT/bench-$ty-pack$pack.json'));print('pack=$pack pp512 %.0f tg128 %.1f roof %.1f share %.1f%% fixed %.0f us bw %.0f GB/s' % (d['pp']['tokens_per_s'],d['tg']['tokens_per_s'],d['roofline_tokens_per_s'],100*d['tg']['roofline_share'],d['tg']['fixed_cost_us_per_token'],d['bandwidth_bytes_per_s']/1e9))" || tail -5 "$OUT/bench-$ty-pack$pack.err"
    [ "${BASELINE:-1}" = 1 ] || break
  done
  rm -f /tmp/m.gguf
done
