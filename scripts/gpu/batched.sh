#!/usr/bin/env bash
# Batched decode on one GPU beside llama.cpp, in one call (~8-9 minutes on 16 cores): builds shardlm (this
# tree) and, in the background, llama.cpp's llama-batched-bench (CUDA, sm_90) from the carried peer tarball;
# runs test_cuda_ops; then for each type in TYPES generates Llama-3.1-8B and runs, interleaved per round,
#   shardlm bench --backend cuda -m F -p 128 -n 128 -r 1 --kv-type f16 -npl $NPL   (once per setting in ENVS)
#   llama-batched-bench -m F -c C -b 2048 -ub 512 -npp 128 -ntg 128 -npl $NPL -fa on -ngl 99
# (issue 18's comparison: aggregate decode tokens/s, S_TG).
#   run: bash scripts/gpu/batched.sh   (carry: build-gpu-deps, holding include/, googletest/ and
#        llama.cpp-d32676d.tar.xz from ../shared/peers)
# KERNELS (e.g. q4_0,q4_k: also time the matmuls alone at steps of TOK tokens, default 16,64,128), TYPES (default q4_0), NPL (default 1,8,32,64), ROUNDS (default 2), ENVS (default "-": none; e.g.
# "- SHARDLM_CUDA_TOKENS_MAX=1"; commas separate several variables of one setting), BASE_TAR: a `git archive`
# tarball of another commit (CMakeLists.txt src apps) to build and run beside this tree as "base".
set -uo pipefail
OUT=${OUT:-/tmp/o}
mkdir -p "$OUT"
D=$PWD/build-gpu-deps
t0=$(date +%s)
el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; date -u +"%Y-%m-%dT%H:%MZ"
if [ -f "$D/llama.cpp-d32676d.tar.xz" ]; then
  (mkdir -p build-llama && tar -xJf "$D/llama.cpp-d32676d.tar.xz" -C build-llama &&
   cmake -S build-llama -B build-llama/b -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
     -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
     -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF &&
   ninja -C build-llama/b -j8 llama-batched-bench) >"$OUT/llama-build.log" 2>&1 &
  lp=$!
else
  lp=
fi
cmake -S . -B build-dev -G Ninja -DCMAKE_BUILD_TYPE=Release -DSHARDLM_CUDA=ON -DSHARDLM_BENCH=OFF -DSHARDLM_MPI=OFF \
  -DSHARDLM_DEPS_DIR="$D" >"$OUT/cmake.log" 2>&1 || { tail -20 "$OUT/cmake.log"; exit 1; }
ninja -C build-dev -j12 shardlm test_cuda_ops  >"$OUT/build.log" 2>&1 || { grep -E "error" -A3 "$OUT/build.log" | head -40; exit 1; }
el "built shardlm"
base=
if [ -n "${BASE_TAR:-}" ]; then
  mkdir -p build-base-src && tar -xf "$BASE_TAR" -C build-base-src
  cmake -S build-base-src -B build-base -G Ninja -DCMAKE_BUILD_TYPE=Release -DSHARDLM_CUDA=ON -DSHARDLM_BENCH=OFF \
    -DSHARDLM_MPI=OFF -DSHARDLM_TESTS=OFF -DSHARDLM_DEPS_DIR="$D" >"$OUT/cmake-base.log" 2>&1 &&
    ninja -C build-base -j12 shardlm >"$OUT/build-base.log" 2>&1 && base=build-base/apps/shardlm/shardlm
  el "built base: ${base:-failed}"
fi
timeout 240 build-dev/tests/cuda/test_cuda_ops >"$OUT/test_cuda_ops.log" 2>&1; echo "test_cuda_ops rc=$?"
grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|worst|differs" "$OUT/test_cuda_ops.log" | head -30
if [ -n "${KERNELS:-}" ]; then
  # The matmuls alone at steps of TOK tokens (shardlm_cuda_bench --tokens), once per setting in ENVS, while
  # llama.cpp still builds on the CPUs.
  ninja -C build-dev -j12 shardlm_cuda_bench >>"$OUT/build.log" 2>&1 || echo "shardlm_cuda_bench did not build"
  for e in ${ENVS:--}; do
    vars=${e//,/ }; [ "$e" = - ] && vars=
    echo "== matmuls $e"
    env $vars build-dev/src/backends/cuda/shardlm_cuda_bench --quick --matvec-only --types "$KERNELS" \
      --tokens "${TOK:-16,64,128}" 2>&1 | grep -vE "^$|^device"
  done
  el "matmuls done"
fi
[ -n "$lp" ] && { wait "$lp"; echo "llama.cpp build rc=$?"; tail -2 "$OUT/llama-build.log"; }
el "tests done"
bin=build-dev/apps/shardlm/shardlm
llama=build-llama/b/bin/llama-batched-bench
npl=${NPL:-1,8,32,64}
maxn=$(echo "$npl" | tr , '\n' | sort -n | tail -1)
for ty in ${TYPES:-q4_0}; do
  f=/tmp/8b-$ty.gguf
  $bin gen-model --arch llama-3.1-8b --type "$ty" -o "$f" -q || exit 1
  for round in $(seq "${ROUNDS:-2}"); do
    for e in ${ENVS:--}; do
      vars=${e//,/ }; [ "$e" = - ] && vars=
      echo "== $ty round $round shardlm $e"
      timeout 120 env $vars $bin bench --backend cuda -m "$f" -p 128 -n 128 -r 1 --kv-type f16 -npl "$npl" 2>&1 | grep -E "^\| [0-9]"
    done
    if [ -n "$base" ]; then
      echo "== $ty round $round base"
      timeout 120 $base bench --backend cuda -m "$f" -p 128 -n 128 -r 1 --kv-type f16 -npl "$npl" 2>&1 | grep -E "^\| [0-9]"
    fi
    if [ -x "$llama" ]; then
      echo "== $ty round $round llama-batched-bench"
      timeout 150 $llama -m "$f" -c $(( maxn * 256 + 256 )) -b 2048 -ub 512 -npp 128 -ntg 128 -npl "$npl" -fa on -ngl 99 \
        2>/dev/null | grep -E "^\|"
    fi
    el "round $round"
  done
  rm -f "$f"
done
