#!/usr/bin/env bash
# One single-GPU iteration of the packed-matvec work (docs/cuda_kernels.md, third round): run_packed.sh's
# build and tests, the matvec bench per SHARDLM_PK_VARIANT (VARIANTS, default "0 2"), the decode-step bench,
# 8B benches for E2E types (default q4_0 q8_0 q4_k_m) and ncu on one pipelined-matvec launch.
#   run: bash scripts/gpu/x1run.sh    (carry: build-gpu-deps)
set -uo pipefail
OUT=${OUT:-/tmp/o}
SKIP_MICRO=1 bash scripts/gpu/run_packed.sh 2>&1 | tail -12
bench=build-dev/src/backends/cuda/shardlm_cuda_bench
for v in ${VARIANTS:-0 2}; do SHARDLM_PK_VARIANT=$v $bench --matvec-only --quick --types q8_0,q4_0,q4_k,q6_k 2>&1 | grep -E "^q" | sed "s/^/v$v /"; done
$bench --decode-only --types bf16,q8_0,q4_0,q4_k 2>&1 | grep -E "^decode"
bin=build-dev/apps/shardlm/shardlm
for ty in ${E2E:-q4_0 q8_0 q4_k_m}; do
  $bin gen-model --arch llama-3.1-8b --type $ty -o /tmp/m.gguf -q || exit 1
  $bin bench --backend cuda -m /tmp/m.gguf -p 512 -n 128 -r 3 -q --kv-type f16 --json >"$OUT/bench-$ty.json" 2>"$OUT/bench-$ty.err"
  python3 -c "import json;d=json.load(open('$OUT/bench-$ty.json'));print('$ty pp512 %.0f tg128 %.1f roof %.1f share %.1f%% fixed %.0f us' % (d['pp']['tokens_per_s'],d['tg']['tokens_per_s'],d['roofline_tokens_per_s'],100*d['tg']['roofline_share'],d['tg']['fixed_cost_us_per_token']))" || tail -5 "$OUT/bench-$ty.err"
  rm -f /tmp/m.gguf
done
for skip in 70; do
  timeout 100 ncu --kernel-name regex:matvec_pipe --launch-skip $skip --launch-count 1 --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
    $bench --matvec-only --quick --types q4_0 > $OUT/ncu-$skip.txt 2>&1; echo "ncu rc=$?"
  grep -E "Duration|DRAM Throughput|SM Active|Issued Warp|No Eligible|Active Warps Per|Eligible Warps|Warp Cycles Per Issued" $OUT/ncu-$skip.txt | head -20
done
