#!/usr/bin/env bash
# Records llama.cpp's side of the weight-type checks (tests/data/quant/): llama-quantize turns
# tests/data/quant/aidreams-w256-f16.gguf (the bundled trained model in 256-wide rows, made by
# scripts/make_aidreams_w256.py) into every scheme shardlm writes and, with an importance matrix from
# llama-imatrix, into pure files of the types only an imatrix can write (kept in tests/data/quant/), and
# llama-perplexity measures each. Writes tests/data/quant/llama_quant_types.json: per scheme the perplexity
# and a hash of llama-quantize's tensor data (test_e2e quantizes the same file with `shardlm convert` and
# checks both); per pure file its perplexity.
# With SHARDLM given it also measures, for the record (docs/quality.md), the KL divergence of shardlm's
# perplexity run on each file from llama.cpp's own log-probabilities on the same file.
#   scripts/llama_quant_types_reference.sh LLAMA_BIN_DIR LLAMA_CPP_TARBALL [SHARDLM] [WORK_DIR]
# (LLAMA_BIN_DIR holds llama-quantize, llama-perplexity, llama-imatrix: see scripts/llama_perplexity_reference.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:?usage: $0 LLAMA_BIN_DIR LLAMA_CPP_TARBALL [SHARDLM] [WORK_DIR]}
tarball=${2:?usage: $0 LLAMA_BIN_DIR LLAMA_CPP_TARBALL [SHARDLM] [WORK_DIR]}
shardlm=${3:-}
work=${4:-/tmp/llama-quant-types}
mkdir -p "$work"
base=tests/data/quant/aidreams-w256-f16.gguf
text=tests/data/text/fsf-licenses.txt
ctx=128
chunks=30          # 1,920 scored tokens: test_e2e runs shardlm on 26 files, in seconds each
imatrix_chunks=100
ppl() {  # model -> "PPL ERR"
  "$bin/llama-perplexity" -m "$1" -f "$text" -c $ctx -b $ctx --chunks $chunks -t 2 > "$work/ppl.out" 2>&1
  grep -ho "Final estimate: PPL = [0-9.]* +/- [0-9.]*" "$work/ppl.out" | awk '{print $5, $7}'
}
mkdir -p "$work/py" && tar -xJf "$tarball" -C "$work/py" --wildcards '*gguf-py/gguf/*'
tensor_hash() {  # FNV-1a 64 over every tensor's data bytes, tensors by name (as test_e2e computes it;
                 # llama-quantize writes them in its loader's order, not the input file's)
  /usr/bin/python3 - "$1" "$work/py" <<'PY'
import os, sys
root = next(os.path.join(d, "gguf-py") for d, s, _ in os.walk(sys.argv[2]) if "gguf-py" in s)
sys.path.insert(0, root)
from gguf.gguf_reader import GGUFReader
h = 0xcbf29ce484222325
for t in sorted(GGUFReader(sys.argv[1]).tensors, key=lambda t: t.name):
    for b in bytes(t.data.tobytes()):
        h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
print(f"{h:016x}")
PY
}
kl() {  # llama.cpp's file, shardlm's file -> mean KLD of shardlm's run from llama.cpp's log-probabilities
  [ -n "$shardlm" ] || { echo null; return; }
  rm -f "$work/base.kl"
  "$bin/llama-perplexity" -m "$1" -f "$text" -c $ctx -b $ctx --chunks 20 -t 2 --kl-divergence-base "$work/base.kl" > /dev/null 2>&1
  "$shardlm" perplexity -m "$2" --kl-divergence-base "$work/base.kl" --kl-divergence -c $ctx -b $ctx -q 2>&1 |
    grep -h "Mean    KLD:" | awk '{print $3}'
}
imatrix=tests/data/quant/aidreams-w256-imatrix.gguf
rm -f "$imatrix"
"$bin/llama-imatrix" -m "$base" -f "$text" -c $ctx --chunks $imatrix_chunks -t 2 -o "$imatrix" > "$work/imatrix.log" 2>&1
read -r p e <<< "$(ppl "$base")"
entries=("$(printf '  "base": {"model": "%s", "ppl": %s, "ppl_error": %s}' "$base" "$p" "$e")")
schemes=()
for s in q8_0 q6_k q5_k_m q5_k_s q5_1 q5_0 q4_k_m q4_k_s q4_1 q4_0 iq4_nl iq4_xs q3_k_l q3_k_m q3_k_s iq3_m iq3_s q2_k; do
  f="$work/llama-$s.gguf"
  "$bin/llama-quantize" "$base" "$f" "${s^^}" 2 > "$work/quantize-$s.log" 2>&1
  read -r p e <<< "$(ppl "$f")"
  h=$(tensor_hash "$f")
  k=null
  if [ -n "$shardlm" ]; then
    "$shardlm" convert --from gguf "$base" --type "$s" -o "$work/ours-$s.gguf" -q
    k=$(kl "$f" "$work/ours-$s.gguf")
  fi
  schemes+=("$(printf '    {"scheme": "%s", "ppl": %s, "ppl_error": %s, "tensor_fnv1a64": "%s", "kld_shardlm_vs_llama": %s}' "$s" "$p" "$e" "$h" "$k")")
  echo "$s ppl $p hash $h kld $k"
done
pure=()
# Pure files (every 2-D tensor of one type) by the llama_ftype whose default type it is (IQ2_S is the
# default of IQ2_M). llama-imatrix records no importance for token_embd (it is only looked up; the tied
# output reuses it), and these types cannot be written without one, so token_embd stays Q8_0 there.
declare -A ftype=([iq3_xxs]=IQ3_XXS [iq2_s]=IQ2_M [iq2_xxs]=IQ2_XXS [iq2_xs]=IQ2_XS [iq1_s]=IQ1_S [iq1_m]=IQ1_M)
for t in iq3_xxs iq2_s iq2_xxs iq2_xs iq1_s iq1_m mxfp4; do
  f="tests/data/quant/aidreams-w256-$t.gguf"
  rm -f "$f"
  if [ "$t" = mxfp4 ]; then
    "$bin/llama-quantize" --pure "$base" "$f" MXFP4_MOE 2 > "$work/quantize-$t.log" 2>&1
  else
    "$bin/llama-quantize" --pure --imatrix "$imatrix" --token-embedding-type q8_0 "$base" "$f" \
      "${ftype[$t]}" 2 > "$work/quantize-$t.log" 2>&1
  fi
  read -r p e <<< "$(ppl "$f")"
  k=$(kl "$f" "$f")
  pure+=("$(printf '    {"model": "%s", "type": "%s", "ppl": %s, "ppl_error": %s, "kld_shardlm_vs_llama": %s}' "$f" "$t" "$p" "$e" "$k")")
  echo "$t ppl $p kld $k"
done
# With the importance matrix: every scheme, the tensor bytes only (test_e2e checks `convert --imatrix` writes them).
with_imatrix=()
for s in q8_0 q6_k q5_k_m q5_k_s q5_1 q5_0 q4_k_m q4_k_s q4_1 q4_0 iq4_nl iq4_xs q3_k_l q3_k_m q3_k_s iq3_m iq3_s q2_k \
         iq3_xs iq3_xxs q2_k_s iq2_m iq2_s iq2_xs iq2_xxs iq1_m iq1_s; do
  f="$work/llama-imatrix-$s.gguf"
  "$bin/llama-quantize" --imatrix "$imatrix" "$base" "$f" "${s^^}" 2 > "$work/quantize-imatrix-$s.log" 2>&1
  h=$(tensor_hash "$f")
  with_imatrix+=("$(printf '    {"scheme": "%s", "tensor_fnv1a64": "%s"}' "$s" "$h")")
  echo "$s+imatrix hash $h"
done
{
  echo '{'
  echo "  \"llama_cpp\": \"$(basename "$tarball")\","
  echo "  \"chunks\": $chunks,"
  echo "  \"command\": \"llama-perplexity -m MODEL -f $text -c $ctx -b $ctx --chunks $chunks -t 2\","
  echo "${entries[0]},"
  echo '  "schemes": ['
  (IFS=$'\n'; echo "${schemes[*]}" | sed '$!s/$/,/')
  echo '  ],'
  echo "  \"imatrix\": \"$imatrix\","
  echo '  "imatrix_schemes": ['
  (IFS=$'\n'; echo "${with_imatrix[*]}" | sed '$!s/$/,/')
  echo '  ],'
  echo '  "pure": ['
  (IFS=$'\n'; echo "${pure[*]}" | sed '$!s/$/,/')
  echo '  ]'
  echo '}'
} > tests/data/quant/llama_quant_types.json
echo "wrote tests/data/quant/llama_quant_types.json"
