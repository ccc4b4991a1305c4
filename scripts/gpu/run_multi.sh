#!/usr/bin/env bash
# On a lent machine with several GPUs (nvidia-h100-x2 and up): builds with MPI + NCCL from the carried
# build-gpu-deps, runs the NCCL tests (collectives against host sums, the stall watchdog, the golden
# models under tp 2 / pp 2 (/ tp 2 x pp 2 on 4 GPUs) against one GPU), then benches a Llama-3.1-8B-shaped
# bf16 gen-model at tp 1, tp 2 and pp 2.
#   run: bash scripts/gpu/run_multi.sh        (carry: build-gpu-deps, build-nccl-deps)
# SKIP_BENCH=1 stops after the tests. NVLink multicast stays off (NCCL_NVLS_ENABLE=0): on shared hosts a
# program that uses it can put the GPUs out of service.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 SHARDLM_COMM=${SHARDLM_COMM:-nccl}
OUT=${OUT:-/tmp/shardlm-multi-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
nvidia-smi topo -m 2>/dev/null | head -4 | tee -a "$OUT/gpu.txt"
date -u +"%Y-%m-%dT%H:%MZ" | tee -a "$OUT/gpu.txt"
n_gpu=$(nvidia-smi -L | wc -l)
t0=$(date +%s)
source scripts/gpu/mpi_cmake_args.sh
cmake -S . -B build-multi -G Ninja -DCMAKE_BUILD_TYPE=Release -DSHARDLM_CUDA=ON -DSHARDLM_NCCL=ON -DSHARDLM_MPI=ON \
  -DSHARDLM_BENCH=OFF -DSHARDLM_DEPS_DIR="$PWD/build-gpu-deps" \
  "${mpi_args[@]}" >"$OUT/cmake.log" 2>&1 || { tail -30 "$OUT/cmake.log"; exit 1; }
grep -E "NCCL|MPI" "$OUT/cmake.log"
ninja -C build-multi -j$(nproc) shardlm nccl_collectives nccl_golden_worker test_nccl >"$OUT/build.log" 2>&1 \
  || { grep -E "error" -A3 "$OUT/build.log" | head -60; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
bin=build-multi/apps/shardlm/shardlm
mpirun --allow-run-as-root --oversubscribe --bind-to none -x NCCL_NVLS_ENABLE -np "$n_gpu" \
  build-multi/tests/nccl/nccl_collectives 2>&1 | tee "$OUT/collectives.log" | grep -vE "^ok:"
timeout 400 build-multi/tests/nccl/test_nccl >"$OUT/test_nccl.log" 2>&1; echo "test_nccl rc=$?"
grep -E "^\[  (FAILED|PASSED|SKIPPED|     OK) |Failure|Expected|Which is|worst" "$OUT/test_nccl.log" | head -40
[ "${SKIP_BENCH:-0}" = 1 ] && exit 0
t1=$(date +%s)
$bin gen-model --arch llama-3.1-8b --type bf16 -o /tmp/m.gguf -q || exit 1
echo "gen-model: $(( $(date +%s) - t1 )) s"
summary() {
  python3 -c "import json,sys;d=json.load(open(sys.argv[1]));print('%s: pp512 %.0f tok/s, tg128 %.1f tok/s (comm share %s)' % (sys.argv[2], d['pp']['tokens_per_s'], d['tg']['tokens_per_s'], d['tg'].get('comm_share', d.get('comm_share','?'))))" "$1" "$2" \
    || tail -5 "${1%.json}.err"
}
layouts=${LAYOUTS:-"1,1 2,1 1,2"}
for l in $layouts; do
  tp=${l%,*}; pp=${l#*,}
  [ $((tp * pp)) -gt "$n_gpu" ] && continue
  name=bench-tp$tp-pp$pp
  timeout 300 $bin bench --backend cuda -m /tmp/m.gguf --tp "$tp" --pp "$pp" -p 512 -n 128 -r 3 -q --kv-type f16 --json \
    >"$OUT/$name.json" 2>"$OUT/$name.err"
  summary "$OUT/$name.json" "tp $tp pp $pp (nccl)"
done
if [ "$n_gpu" -ge 2 ]; then
  # The same tp 2 with plain MPI (collectives staged through host memory, no graphs), for comparison.
  SHARDLM_COMM=mpi timeout 300 $bin bench --backend cuda -m /tmp/m.gguf --tp 2 -p 512 -n 64 -r 1 -q --kv-type f16 --json \
    >"$OUT/bench-tp2-mpi.json" 2>"$OUT/bench-tp2-mpi.err"
  summary "$OUT/bench-tp2-mpi.json" "tp 2 pp 1 (mpi, host-staged)"
fi
rm -f /tmp/m.gguf
echo "total: $(( $(date +%s) - t0 )) s"
