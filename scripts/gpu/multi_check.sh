#!/usr/bin/env bash
# After the NCCL exit fix: the NCCL gtest (collectives, golden models at tp 2 / pp 2 against one GPU) and the
# 8B BF16 bench at pp 2, within a few minutes.  run (nvidia-h100-x2): carry build-gpu-deps, build-nccl-deps
set -uo pipefail
export NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source scripts/gpu/mpi_cmake_args.sh
cmake -S . -B build-multi -G Ninja -DCMAKE_BUILD_TYPE=Release -DSHARDLM_CUDA=ON -DSHARDLM_NCCL=ON -DSHARDLM_MPI=ON \
  -DSHARDLM_BENCH=OFF -DSHARDLM_DEPS_DIR="$PWD/build-gpu-deps" \
  "${mpi_args[@]}" >"$OUT/build.txt" 2>&1
ninja -C build-multi -j$(nproc) shardlm nccl_collectives nccl_golden_worker test_nccl >>"$OUT/build.txt" 2>&1 \
  || { grep -E "error" -A3 "$OUT/build.txt" | head -30; exit 1; }
timeout 150 build-multi/tests/nccl/test_nccl >"$OUT/test_nccl.log" 2>&1; echo "test_nccl rc=$?"
grep -E "^\[  (FAILED|PASSED|SKIPPED) |^\[       OK|Failure" "$OUT/test_nccl.log" | head -20
bin=build-multi/apps/shardlm/shardlm
$bin gen-model --arch llama-3.1-8b --type bf16 -o /tmp/m.gguf -q
timeout 120 $bin bench --backend cuda -m /tmp/m.gguf --pp 2 -p 512 -n 128 -r 3 -q --kv-type f16 --json >"$OUT/pp2.json" 2>"$OUT/pp2.err"
echo "pp2 rc=$?: $(python3 -c "import json;d=json.load(open('$OUT/pp2.json'));print('pp512 %.0f tg128 %.1f comm %.3f roof %.1f' % (d['pp']['tokens_per_s'],d['tg']['tokens_per_s'],d['tg']['comm_share'],d['roofline_tokens_per_s']))" 2>&1 | tail -1)"
