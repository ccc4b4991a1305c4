#!/usr/bin/env bash
# Replays each fuzz target's committed corpus (fuzz/corpus/<target>/), then fuzzes it for a fixed number of
# runs from a fixed seed, so a CI run is repeatable and a random new finding cannot fail an unrelated change.
# New inputs go to a scratch copy of the corpus, not into the repository.
#   fuzz/run.sh BUILD_DIR [RUNS_PER_TARGET=20000] [extra libFuzzer flags, e.g. -max_total_time=900]
# A crash, a leak, a sanitizer report or a timeout stops with the target's name and the input (crash-*), exit 1.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:?usage: fuzz/run.sh BUILD_DIR [RUNS] [libFuzzer flags]}
runs=${2:-20000}
shift $(( $# >= 2 ? 2 : 1 ))
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for t in fuzz_gguf fuzz_safetensors fuzz_tokenizer fuzz_chat_template fuzz_openai fuzz_llama2c; do
  bin="$build/fuzz/$t"
  [ -x "$bin" ] || { echo "fuzz/run.sh: $bin is missing (configure with clang and -DSHARDLM_FUZZ=ON)"; exit 1; }
  mkdir -p "$scratch/$t"
  cp -r "fuzz/corpus/$t/." "$scratch/$t/"
  dict=fuzz/json.dict
  case $t in fuzz_gguf|fuzz_llama2c) dict=fuzz/gguf.dict ;; esac
  t0=$(date +%s)
  # -max_len 64 KiB: longer inputs only slow the search; -timeout 10 s per input catches hangs.
  if ! "$bin" "$scratch/$t" -seed=1 -runs="$runs" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
       -dict="$dict" -artifact_prefix="$scratch/" -print_final_stats=1 "$@" > "$scratch/$t.log" 2>&1; then
    tail -40 "$scratch/$t.log"
    for a in "$scratch"/crash-* "$scratch"/leak-* "$scratch"/timeout-* "$scratch"/oom-*; do
      [ -e "$a" ] && { echo "input: $a"; od -c "$a" | head -20; }
    done
    echo "fuzz/run.sh: $t FAILED"
    exit 1
  fi
  execs=$(grep -o "stat::number_of_executed_units: *[0-9]*" "$scratch/$t.log" | grep -o "[0-9]*$" || echo "?")
  cov=$(grep -o "cov: [0-9]*" "$scratch/$t.log" | tail -1 | grep -o "[0-9]*" || echo "?")
  echo "$t: $execs executions, coverage $cov edges, corpus $(ls "$scratch/$t" | wc -l) inputs, $(( $(date +%s) - t0 )) s"
done
