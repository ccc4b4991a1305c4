#!/usr/bin/env bash
# A/B of backend switches end to end on one GPU: for each type in TYPES, `bench -p 0 -n 128 -r 3` once per
# environment setting in ENVS (space-separated; "-" = none; commas separate several variables of one setting).
#   run: TYPES="q4_0 q8_0" ENVS="- SHARDLM_CUDA_FUSE_ROPE=0" bash scripts/gpu/x1env.sh   (carry: build-gpu-deps)
# What kinds of decode kernels cost inside the graph: ENVS="- SHARDLM_CUDA_SKIP=norm SHARDLM_CUDA_SKIP=attn ...".
# NO_BUILD=1: use the build-dev binary already there.
set -uo pipefail
OUT=${OUT:-/tmp/o}
mkdir -p "$OUT"
source scripts/gpu/build_dev.sh
[ "${NO_BUILD:-0}" = 1 ] || build_dev shardlm
bin=build-dev/apps/shardlm/shardlm
for ty in ${TYPES:-q4_0 q4_k_m q8_0}; do
  $bin gen-model --arch llama-3.1-8b --type $ty -o /tmp/m.gguf -q || exit 1
  for e in ${ENVS:--}; do
    vars=${e//,/ }; [ "$e" = - ] && vars=
    env $vars $bin bench --backend cuda -m /tmp/m.gguf -p 0 -n 128 -r 3 -q --kv-type f16 --json >"$OUT/ab.json" 2>"$OUT/ab.err"
    python3 -c "import json;d=json.load(open('$OUT/ab.json'));t=d['tg']['tokens_per_s'];print('$ty %-60s tg128 %6.1f  %7.1f us/token share %.1f%%' % ('$e',t,1e6/t,100*d['tg']['roofline_share']))" || tail -3 "$OUT/ab.err"
  done
  rm -f /tmp/m.gguf
done
