#!/usr/bin/env bash
# On a lent GPU machine: builds the whole project with CUDA (dependencies from the carried
# build-gpu-deps: include/, googletest/; test fixtures from tests/data), runs the GPU golden tests and the op suite, then
# benchmarks Llama-3.1-8B-shaped gen-model files (generated here, deleted after use).
#   run: bash scripts/gpu/run_e2e.sh [types...]     (carry: build-gpu-deps)
set -uo pipefail
OUT=${OUT:-/tmp/shardlm-gpu-out}
mkdir -p "$OUT"
source scripts/gpu/build_dev.sh
build_dev shardlm test_golden_cuda test_cuda_ops test_cuda_pack test_golden
bin=build-dev/apps/shardlm/shardlm
[ "${SKIP_TESTS:-0}" = 1 ] || run_tests build-dev/tests/model/test_golden_cuda build-dev/tests/model/test_golden build-dev/tests/cuda/test_cuda_ops build-dev/tests/cuda/test_cuda_pack
types=${*:-bf16 q8_0 q4_0 q4_k_m}
for ty in $types; do
  $bin gen-model --arch llama-3.1-8b --type $ty -o /tmp/m.gguf -q || exit 1
  echo "== llama-3.1-8b $ty"
  $bin bench --backend cuda -m /tmp/m.gguf -p 512 -n 128 -r 3 -q --kv-type f16 --json >"$OUT/bench-$ty.json" 2>"$OUT/bench-$ty.err"
  python3 -c "import json;d=json.load(open('$OUT/bench-$ty.json'));print('pp512 %.0f tg128 %.1f roof %.1f share %.1f%% fixed %.0f us bw %.0f GB/s' % (d['pp']['tokens_per_s'],d['tg']['tokens_per_s'],d['roofline_tokens_per_s'],100*d['tg']['roofline_share'],d['tg']['fixed_cost_us_per_token'],d['bandwidth_bytes_per_s']/1e9))" || tail -5 "$OUT/bench-$ty.err"
  if [ "$ty" = "${GRAPHLESS_TYPE:-q4_0}" ]; then
    # The same decode with each of this round's changes turned off, for their share.
    for v in "SHARDLM_CUDA_PREQUANT=0|" "SHARDLM_CUDA_PREQUANT=1|--full-logits" "SHARDLM_CUDA_FUSE_ROPE=0|"; do
      envv=${v%|*}; flag=${v#*|}
      env $envv $bin bench --backend cuda -m /tmp/m.gguf -p 0 -n 128 -r 3 -q --kv-type f16 $flag --json >"$OUT/bench-$ty-ab.json" 2>&1
      python3 -c "import json;d=json.load(open('$OUT/bench-$ty-ab.json'));print('$envv $flag: tg128 %.1f fixed %.0f us' % (d['tg']['tokens_per_s'],d['tg']['fixed_cost_us_per_token']))"
    done
    $bin bench --backend cuda -m /tmp/m.gguf -p 0 -n 128 -r 3 -q --kv-type f16 --no-cuda-graphs --json >"$OUT/bench-$ty-nograph.json" 2>&1
    python3 -c "import json;d=json.load(open('$OUT/bench-$ty-nograph.json'));print('no graphs: tg128 %.1f fixed %.0f us' % (d['tg']['tokens_per_s'],d['tg']['fixed_cost_us_per_token']))"
    $bin bench --backend cuda -m /tmp/m.gguf -p 64 -n 32 -r 1 -q --kv-type f16 -ngl 16 --json >"$OUT/bench-$ty-ngl16.json" 2>&1
    python3 -c "import json;d=json.load(open('$OUT/bench-$ty-ngl16.json'));print('-ngl 16: pp64 %.1f tg32 %.2f' % (d['pp']['tokens_per_s'],d['tg']['tokens_per_s']))"
  fi
  rm -f /tmp/m.gguf
done
