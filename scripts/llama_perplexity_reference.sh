#!/usr/bin/env bash
# Records llama.cpp's own figures for the perplexity tests (tests/data/text/): builds llama-perplexity and
# llama-quantize from a llama.cpp source tarball on the CPU, quantizes the bundled model to Q8_0 and Q4_0
# with llama-quantize (files made by llama.cpp's code, kept in tests/data/text/), and runs llama-perplexity on
# the bundled model and on those files over the first chunks of tests/data/text/fsf-licenses.txt. Also saves
# llama.cpp's log-probabilities of the bundled model (--kl-divergence-base, 20 chunks) and its KL divergence
# of the quantized files from them. Writes tests/data/text/llama_perplexity.json and llama-base-f32.kl;
# test_e2e checks `shardlm perplexity` against them. Last, llama.cpp's log-probabilities of gen-model's
# tiny-qwen3 (seed 1, F32: per-head q/k norms, q wider than the hidden state), tiny-qwen3moe and
# tiny-mixtral (experts), for the same check of those graphs: tests/data/text/llama-<preset>-f32.kl (needs
# build/apps/shardlm/shardlm).
#   scripts/llama_perplexity_reference.sh LLAMA_CPP_TARBALL [WORK_DIR]
# (the tarball: ../shared/peers/llama.cpp-d32676d.tar.xz; WORK_DIR default /tmp/llama-ppl-ref)
set -euo pipefail
cd "$(dirname "$0")/.."
tarball=${1:?usage: $0 LLAMA_CPP_TARBALL [WORK_DIR]}
work=${2:-/tmp/llama-ppl-ref}
mkdir -p "$work"
if [ ! -x "$work/b/bin/llama-perplexity" ] || [ ! -x "$work/b/bin/llama-quantize" ]; then
  mkdir -p "$work/src" && tar -xJf "$tarball" -C "$work/src"
  # CPU only, no AMX (its quantized paths crash on some Xeons, see ../shared/peers/README.md).
  cmake -S "$work/src" -B "$work/b" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX2=ON \
    -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF
  ninja -C "$work/b" llama-perplexity llama-quantize
fi
text=tests/data/text/fsf-licenses.txt
ctx=128     # the bundled model's whole training context
chunks=100  # 12,800 tokens (6,300 scored): seconds on one core for both tools
# ffn_down rows are 172 wide, not a multiple of the 32-wide blocks: llama-quantize refuses the model unless
# those tensors get another type, so they are F16 (the other tensors are 64 wide and take Q8_0 / Q4_0).
for q in q8_0 q4_0; do
  rm -f "tests/data/text/aidreams260K-$q.gguf"
  "$work/b/bin/llama-quantize" --tensor-type ffn_down=f16 models/aidreams260K.gguf "tests/data/text/aidreams260K-$q.gguf" "$q" > "$work/quantize-$q.log" 2>&1
done
entries=()
for m in models/aidreams260K.gguf tests/data/text/aidreams260K-q8_0.gguf tests/data/text/aidreams260K-q4_0.gguf; do
  cmd=("$work/b/bin/llama-perplexity" -m "$m" -f "$text" -c "$ctx" -b "$ctx" --chunks "$chunks" -t 2)
  "${cmd[@]}" > "$work/ppl.out" 2> "$work/ppl.err"
  final=$(grep -ho "Final estimate: PPL = [0-9.]* +/- [0-9.]*" "$work/ppl.out" "$work/ppl.err")
  ppl=$(echo "$final" | awk '{print $5}')
  err=$(echo "$final" | awk '{print $7}')
  entries+=("$(printf '    {"model": "%s", "ctx": %d, "chunks": %d, "ppl": %s, "ppl_error": %s, "command": "%s"}' \
    "$m" "$ctx" "$chunks" "$ppl" "$err" "llama-perplexity -m $m -f $text -c $ctx -b $ctx --chunks $chunks -t 2")")
done
# KL divergence: llama.cpp's base file of the F32 model, then each quantized file against it.
base=tests/data/text/llama-base-f32.kl
rm -f "$base"
"$work/b/bin/llama-perplexity" -m models/aidreams260K.gguf -f "$text" -c "$ctx" -b "$ctx" --chunks 20 -t 2 \
  --kl-divergence-base "$base" > "$work/base.out" 2>&1
kl_entries=()
for q in q8_0 q4_0; do
  m=tests/data/text/aidreams260K-$q.gguf
  "$work/b/bin/llama-perplexity" -m "$m" --kl-divergence-base "$base" --kl-divergence -c "$ctx" -b "$ctx" -t 2 \
    > "$work/kl-$q.out" 2>&1
  kld=$(grep -h "Mean    KLD:" "$work/kl-$q.out" | awk '{print $3}')
  top=$(grep -h "Same top p:" "$work/kl-$q.out" | awk '{print $4}')
  kl_entries+=("$(printf '    {"model": "%s", "base": "%s", "mean_kld": %s, "same_top_percent": %s, "command": "%s"}' \
    "$m" "$base" "$kld" "$top" "llama-perplexity -m $m --kl-divergence-base $base --kl-divergence -c $ctx -b $ctx -t 2")")
done
{
  echo '{'
  echo "  \"llama_cpp\": \"$(basename "$tarball")\","
  echo "  \"made\": \"$(date -u +%Y-%m-%d) by scripts/llama_perplexity_reference.sh\","
  echo '  "runs": ['
  (IFS=$'\n'; echo "${entries[*]}" | sed '$!s/$/,/')
  echo '  ],'
  echo "  \"base\": \"llama-perplexity -m models/aidreams260K.gguf -f $text -c $ctx -b $ctx --chunks 20 -t 2 --kl-divergence-base $base\","
  echo '  "kl_divergence": ['
  (IFS=$'\n'; echo "${kl_entries[*]}" | sed '$!s/$/,/')
  echo '  ]'
  echo '}'
} > tests/data/text/llama_perplexity.json
cat tests/data/text/llama_perplexity.json
# Qwen3 and the mixtures of experts (llama.cpp's own qwen3, qwen3moe and llama-with-experts graphs) on files
# shardlm's gen-model writes the same way every time.
for preset in tiny-qwen3 tiny-qwen3moe tiny-mixtral; do
  model=$work/$preset-f32.gguf
  rm -f "$model" "tests/data/text/llama-$preset-f32.kl"
  build/apps/shardlm/shardlm gen-model --arch "$preset" --type f32 --seed 1 -o "$model" -q
  "$work/b/bin/llama-perplexity" -m "$model" -f "$text" -c "$ctx" -b "$ctx" --chunks 2 -t 2 \
    --kl-divergence-base "tests/data/text/llama-$preset-f32.kl" > "$work/$preset.out" 2>&1
done
