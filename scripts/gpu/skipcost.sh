#!/usr/bin/env bash
# Diagnostic: what each kind of decode kernel costs inside the real CUDA-graph step. For each type in TYPES,
# `bench -p 0 -n 128` once per SHARDLM_CUDA_SKIP setting in SKIPS (skipped kernels are not launched, so the
# output is meaningless; only the time counts).   run: bash scripts/gpu/skipcost.sh   (carry: build-gpu-deps)
set -uo pipefail
OUT=${OUT:-/tmp/o}
mkdir -p "$OUT"
source scripts/gpu/build_dev.sh
build_dev shardlm
bin=build-dev/apps/shardlm/shardlm
for ty in ${TYPES:-q4_0 q4_k_m q8_0}; do
  $bin gen-model --arch llama-3.1-8b --type $ty -o /tmp/m.gguf -q || exit 1
  for sk in ${SKIPS:-none norm swiglu rope attn norm,swiglu,rope,attn mv}; do
    SHARDLM_CUDA_SKIP=$sk $bin bench --backend cuda -m /tmp/m.gguf -p 0 -n 128 -r 3 -q --kv-type f16 --json >"$OUT/ab.json" 2>"$OUT/ab.err"
    python3 -c "import json;d=json.load(open('$OUT/ab.json'));t=d['tg']['tokens_per_s'];print('$ty skip=%-24s tg128 %6.1f  %7.1f us/token' % ('$sk',t,1e6/t))" || tail -3 "$OUT/ab.err"
  done
  rm -f /tmp/m.gguf
done
