#!/usr/bin/env bash
# One single-GPU iteration of the packed-matvec work (docs/cuda_kernels.md): build and GPU tests
# (TESTS=0 skips them), the matvec bench per SHARDLM_PK_VARIANT (VARIANTS, default "0 3 4"), 8B benches
# for E2E types (default q4_0) with device token selection and with --full-logits, and ncu stall reasons
# on one launch of each of two Q4_0 matvec shapes (NCU=0 skips it).
#   run: bash scripts/gpu/x1run.sh    (carry: build-gpu-deps)
set -uo pipefail
OUT=${OUT:-/tmp/o}
mkdir -p "$OUT"
source scripts/gpu/build_dev.sh
build_dev shardlm test_golden_cuda test_cuda_ops test_cuda_pack test_golden shardlm_cuda_bench
[ "${TESTS:-1}" = 1 ] && run_tests build-dev/tests/cuda/test_cuda_ops build-dev/tests/model/test_golden_cuda build-dev/tests/model/test_golden
bench=build-dev/src/backends/cuda/shardlm_cuda_bench
for v in ${VARIANTS:-0 3 4}; do SHARDLM_PK_VARIANT=$v $bench --matvec-only --quick --types ${MV_TYPES:-q4_0,q8_0} 2>&1 | grep -E "^(q|dev)" | sed "s/^/v$v /"; done
bin=build-dev/apps/shardlm/shardlm
for ty in ${E2E:-q4_0}; do
  $bin gen-model --arch llama-3.1-8b --type $ty -o /tmp/m.gguf -q || exit 1
  for mode in cand full; do
    flag=""; [ $mode = full ] && flag=--full-logits
    $bin bench --backend cuda -m /tmp/m.gguf -p 512 -n 128 -r 3 -q --kv-type f16 $flag --json >"$OUT/bench-$ty-$mode.json" 2>"$OUT/bench-$ty-$mode.err"
    python3 -c "import json;d=json.load(open('$OUT/bench-$ty-$mode.json'));print('$ty $mode pp512 %.0f tg128 %.1f roof %.1f share %.1f%% fixed %.0f us' % (d['pp']['tokens_per_s'],d['tg']['tokens_per_s'],d['roofline_tokens_per_s'],100*d['tg']['roofline_share'],d['tg']['fixed_cost_us_per_token']))" || tail -5 "$OUT/bench-$ty-$mode.err"
  done
  rm -f /tmp/m.gguf
done
if [ "${NCU:-1}" = 1 ]; then
  # Q4_0 quick matvec bench: 60 launches per shape (10 warm-up + 50); 70 lands in 14336x4096, 130 in 4096x14336.
  for skip in 70 130; do
    timeout 150 ncu --kernel-name regex:matvec_pipe --launch-skip $skip --launch-count 1 --section SpeedOfLight \
      --section WarpStateStats --section SchedulerStats --section LaunchStats --section Occupancy --section MemoryWorkloadAnalysis \
      $bench --matvec-only --quick --types q4_0 > $OUT/ncu-$skip.txt 2>&1; echo "ncu $skip rc=$?"
    grep -E "Grid Size|Registers Per|Duration|DRAM Throughput|Issued Warp|No Eligible|Active Warps Per|Eligible Warps|Warp Cycles Per Issued|Achieved Occupancy|Theoretical Occ|L2 Hit|L1/TEX Hit|Stall|stall" $OUT/ncu-$skip.txt | head -40
  done
fi
