#!/usr/bin/env bash
# Decode speed after a long prompt (the decode attention then has many splits), under several environments:
#   M=/tmp/m8.gguf N_PROMPT=3000 LAYOUTS="1 4" VARIANTS="new: b1:SHARDLM_CUDA_ATTN_BLOCKS_PER_KV_HEAD=1" \
#     bash scripts/gpu/longctx.sh
# Prints one line per layout and variant with shardlm generate's own figures (prompt and generated tok/s).
set -uo pipefail
export NCCL_NVLS_ENABLE=0
BIN=${BIN:-build-multi/apps/shardlm/shardlm}
M=${M:?the model file}
N_PROMPT=${N_PROMPT:-3000}
N_GEN=${N_GEN:-256}
IDS=$(python3 -c "print(','.join(str(10 + (i * 7919) % 20000) for i in range($N_PROMPT)))")
for tp in ${LAYOUTS:-1}; do
  for v in ${VARIANTS:-"new:"}; do
    name=${v%%:*}
    IFS=, read -r -a envs <<<"${v#*:}"
    line=$(env "${envs[@]}" timeout -k 5 "${STEP_S:-60}" "$BIN" generate --backend cuda -m "$M" --tp "$tp" \
      --prompt-ids "$IDS" -n "$N_GEN" --greedy --ignore-eos -c 4096 --kv-type f16 2>&1 >/dev/null | grep "generated")
    echo "long context tp $tp $name (${envs[*]:-defaults}): $line"
  done
done
