#!/usr/bin/env bash
# Narrows down the NCCL end-to-end hang (docs/multi_gpu.md): the golden stories260K model through the real
# binary under tp 2 and pp 2 with NCCL, with and without CUDA graphs, each bounded by a timeout, against the
# one-GPU ids; then, if tp 2 works without graphs, the 8B bf16 bench at tp 2.
#   run (nvidia-h100-x2): bash scripts/gpu/nccl_bisect.sh   (carry: build-gpu-deps, build-nccl-deps)
set -uo pipefail
export NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
source scripts/gpu/mpi_cmake_args.sh
cmake -S . -B build-multi -G Ninja -DCMAKE_BUILD_TYPE=Release -DSHARDLM_CUDA=ON -DSHARDLM_NCCL=ON -DSHARDLM_MPI=ON \
  -DSHARDLM_BENCH=OFF -DSHARDLM_TESTS=OFF -DSHARDLM_DEPS_DIR="$PWD/build-gpu-deps" "${mpi_args[@]}" >"$OUT/build.txt" 2>&1
ninja -C build-multi -j$(nproc) shardlm >>"$OUT/build.txt" 2>&1 || { grep -E "error" -A3 "$OUT/build.txt" | head -30; exit 1; }
bin=build-multi/apps/shardlm/shardlm
[ -x $bin ] || { tail -20 "$OUT/build.txt"; exit 1; }
F=tests/data/models
$bin convert --from llama2c $F/stories260K.bin --tokenizer $F/aidreams260K.tok512.bin -o /tmp/s.gguf -q
ids=1,400,300,500,264,280
args="generate --backend cuda -m /tmp/s.gguf --prompt-ids $ids -n 24 --greedy --ignore-eos --json -q --kv-type f32"
echo "1 GPU: $(timeout 60 $bin $args 2>&1 | tail -1)"
mp="mpirun --allow-run-as-root --oversubscribe --bind-to none -x NCCL_NVLS_ENABLE -x SHARDLM_COMM -x NCCL_DEBUG -np 2"
for cfg in "--tp 2 --no-cuda-graphs" "--tp 2" "--pp 2 --no-cuda-graphs" "--pp 2"; do
  SHARDLM_COMM=nccl NCCL_DEBUG=WARN timeout 45 $mp $bin $args $cfg --comm-timeout 20 >"$OUT/r.txt" 2>&1
  echo "nccl $cfg rc=$?: $(grep generated_ids "$OUT/r.txt" | tail -1)"; grep -iE "error|abort|stall|warn" "$OUT/r.txt" | head -4
done
SHARDLM_COMM=nccl timeout 45 $mp $bin $args --tp 2 --no-cuda-graphs >/dev/null 2>&1 || exit 0
$bin gen-model --arch llama-3.1-8b --type bf16 -o /tmp/m.gguf -q
for cfg in "--tp 2 --no-cuda-graphs" "--tp 2"; do
  SHARDLM_COMM=nccl timeout 150 $bin bench --backend cuda -m /tmp/m.gguf $cfg -p 512 -n 128 -r 3 -q --kv-type f16 --json >"$OUT/b.json" 2>"$OUT/b.err"
  echo "8B bf16 nccl $cfg rc=$?: $(python3 -c "import json;d=json.load(open('$OUT/b.json'));print('pp512 %.0f tg128 %.1f comm %.2f' % (d['pp']['tokens_per_s'],d['tg']['tokens_per_s'],d['tg']['comm_share']))" 2>&1 | tail -1)"
done
