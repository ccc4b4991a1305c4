#!/usr/bin/env bash
# A/B of two trees on a lent 2-GPU machine, runs interleaved: this tree (new) and the tree in $OLD (default
# _old: `git archive <rev> | tar -x -C _old` before the call; the device copy has no git metadata). Builds both
# like run_multi4.sh, runs test_nccl of the new tree unless SKIP_TESTS=1, then for each bench in BENCHES
# (default "8b 70b") ROUNDS (default 2) rounds of new, old: Llama-3.1-8B BF16 tp 2 (`bench -p 0 -n 128 -r 3`)
# and Llama-3.1-70B Q4_0 tp 2 (sparse file, `bench -p 0 -n 64 -r 2`). Prints tg tok/s per run.
#   run: bash scripts/gpu/ab_multi.sh    (carry: build-gpu-deps, build-nccl-deps)
set -uo pipefail
export NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/ab-multi-out}
OLD=${OLD:-_old}
mkdir -p "$OUT"
T0=$(date +%s)
source scripts/gpu/mpi_cmake_args.sh
build() {  # source dir
  local src=$1
  cmake -S "$src" -B "$src/build-multi" -G Ninja -DCMAKE_BUILD_TYPE=Release -DSHARDLM_CUDA=ON -DSHARDLM_NCCL=ON \
    -DSHARDLM_MPI=ON -DSHARDLM_BENCH=OFF -DSHARDLM_DEPS_DIR="$PWD/build-gpu-deps" "${mpi_args[@]}" \
    >"$OUT/cmake-$2.log" 2>&1 || return 1
  ninja -C "$src/build-multi" -j"$(nproc)" shardlm "${@:3}" >"$OUT/build-$2.log" 2>&1
}
echo "== ab_multi $(date -u +%H:%M:%SZ), new: $(cat COMMIT 2>/dev/null), old: $(cat "$OLD/COMMIT" 2>/dev/null)"
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  build . new nccl_collectives nccl_golden_worker test_nccl || { grep -E "error" -A3 "$OUT/build-new.log" | head -40; exit 1; }
  build "$OLD" old || { grep -E "error" -A3 "$OUT/build-old.log" | head -40; exit 1; }
  echo "builds: $(($(date +%s) - T0)) s"
fi
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  ts=$(date +%s)
  timeout -k 5 240 build-multi/tests/nccl/test_nccl >"$OUT/test_nccl.log" 2>&1
  echo "test_nccl rc=$? in $(($(date +%s) - ts)) s"
  grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|rank [0-9]:|KB all-reduce" "$OUT/test_nccl.log" | head -30
fi
run() {  # label bin args...
  local label=$1 bin=$2
  shift 2
  timeout -k 10 150 "$bin" bench --backend cuda -q --json "$@" >"$OUT/$label.json" 2>"$OUT/$label.err"
  python3 - "$OUT/$label.json" "$label" <<'EOF'
import json, sys
try:
    d = json.load(open(sys.argv[1])); tg = d["tg"]
    print("%-12s tg%d %.1f tok/s (roofline %.1f, %.1f%%)" % (sys.argv[2], tg["n_gen"], tg["tokens_per_s"],
          d["roofline_tokens_per_s"], 100 * tg["roofline_share"]))
except Exception as e:
    print("%-12s FAILED: %s" % (sys.argv[2], open(sys.argv[1][:-5] + ".err").read()[-300:]))
EOF
}
for b in ${BENCHES:-8b 70b}; do
  if [ "$b" = 8b ]; then
    build-multi/apps/shardlm/shardlm gen-model --arch llama-3.1-8b --type bf16 -o /tmp/ab8.gguf -q || exit 1
    args=(-m /tmp/ab8.gguf -p 0 -n 128 -r 3 --kv-type f16 --tp 2)
  else
    build-multi/apps/shardlm/shardlm gen-model --arch llama-3.1-70b --type q4_0 --sparse -o /tmp/ab70.gguf -q || exit 1
    args=(-m /tmp/ab70.gguf -p 0 -n 64 -r 2 --kv-type f16 --tp 2)
  fi
  for r in $(seq 1 "${ROUNDS:-2}"); do
    run "$b-new-$r" build-multi/apps/shardlm/shardlm "${args[@]}"
    run "$b-old-$r" "$OLD/build-multi/apps/shardlm/shardlm" "${args[@]}"
  done
  rm -f /tmp/ab8.gguf /tmp/ab70.gguf
done
echo "== total $(($(date +%s) - T0)) s"
