#!/usr/bin/env bash
# Issue 6 on a lent 4-GPU machine (nvidia-h100-x4), in one call: builds with MPI + NCCL like run_multi.sh, runs
# test_nccl (collectives under auto / nccl / oneshot, stalls, golden models at tp 2 / pp 2 / tp 2 x pp 2
# against one GPU), the golden ids at tp 4 / pp 4 / an uneven split / tp 2 with offloaded layers, benches
# Llama-3.1-8B BF16 at tp 1, 2, 4 (one-shot and NCCL all-reduce), pp 2, pp 4 and tp 2 x pp 2, kills a
# rank of a tp 2 generate, then Llama-3.1-70B Q4_0 at tp 4 and tp 2 (and, if time is left, Q8_0 at tp 2
# and BF16 at tp 4, only to show they run).
#   run: bash scripts/gpu/run_multi4.sh    (carry: build-gpu-deps, build-nccl-deps)
# SKIP_TESTS, SKIP_GOLD, SKIP_KILL, SKIP_70B, SKIP_70B_EXTRA (Q8_0 tp 2 and BF16 tp 4) leave steps out;
# BENCHES (a regex of bench names, e.g. 'tp4|70b') runs only those benches; FUSE_AB (e.g. "norm pdl off")
# runs each tensor-parallel bench once per SHARDLM_ALLREDUCE_FUSE value (default: once, unset); ENV_AB,
# AB_BENCHES and AB_ROUNDS run benches under several environments (see bench() below); P70 is the 70B
# benches' prompt length (default 512; 0 skips their prefill);
# CUDA_TESTS=1 also builds and runs the one-GPU suites (test_cuda_ops, test_cuda_pack, test_golden,
# test_golden_cuda) first.
# Every step has a timeout and the whole script a deadline (BUDGET_S, seconds from its start, default 560):
# a step that cannot finish before it is skipped and says so. Results: $OUT/summary.txt (what is printed)
# and $OUT/results.tgz (every log and JSON), both rewritten after each step.
# Without a GPU (a dry run of the script's logic): SKIP_BUILD=1 BIN=build/apps/shardlm/shardlm BACKEND=cpu
# M8=<small gguf> SKIP_70B=1 SKIP_TESTS=1 bash scripts/gpu/run_multi4.sh
# NVLink multicast stays off (NCCL_NVLS_ENABLE=0): on shared hosts a program that uses it can put the GPUs
# out of service. Clocks and GPU settings are never touched.
set -uo pipefail
export NCCL_NVLS_ENABLE=0
export SHARDLM_COMM=${SHARDLM_COMM:-nccl}
OUT=${OUT:-/tmp/shardlm-multi4-out}
R=${R:-/tmp/multi4}  # all logs; tarred into $OUT/results.tgz after each step
mkdir -p "$OUT" "$R"
T0=$(date +%s)
BUDGET_S=${BUDGET_S:-560}
BACKEND=${BACKEND:-cuda}
BIN=${BIN:-build-multi/apps/shardlm/shardlm}
M8=${M8:-/tmp/m8.gguf}
GEN8=1
KILL_ARGS=${KILL_ARGS:--n 4000 -c 4096}
[ -n "${M8_GIVEN:-}" ] && GEN8=0
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"

say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((T0 + BUDGET_S - $(date +%s))); }
elapsed() { echo $(($(date +%s) - T0)); }
save() {  # atomically, so that a call cut off at its limit still returns a readable archive
  tar -czf "$OUT/.results.tgz" -C "$R" . 2>/dev/null && mv -f "$OUT/.results.tgz" "$OUT/results.tgz"
}
# step_timeout WANT MIN: WANT seconds if the deadline allows, else what is left (minus a margin); prints
# nothing and fails when less than MIN would be left.
step_timeout() {
  local want=$1 min=$2 l
  l=$(($(left) - 10))
  [ "$l" -lt "$min" ] && return 1
  [ "$l" -lt "$want" ] && want=$l
  echo "$want"
}
# Processes this script started that a timeout may have left behind (an orphaned mpirun or rank).
reap() {
  local p
  for p in $(pgrep -f "$BIN (bench|generate)" 2>/dev/null) $(pgrep -f "tests/nccl/nccl_" 2>/dev/null); do
    kill -9 "$p" 2>/dev/null
  done
  return 0
}

say "== run_multi4 $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(cat COMMIT 2>/dev/null || echo "unknown (write it to ./COMMIT before the call: the device copy has no git metadata)")"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=index,name,driver_version,memory.total,memory.used --format=csv,noheader | tee -a "$SUMMARY"
  nvidia-smi topo -m >"$R/topo.txt" 2>&1
  head -6 "$R/topo.txt" | tee -a "$SUMMARY"
  n_gpu=$(nvidia-smi -L | wc -l)
else
  n_gpu=${N_GPU:-4}
fi
say "GPUs: $n_gpu, deadline ${BUDGET_S} s"

# ---- 1. build (as run_multi.sh)
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  source scripts/gpu/mpi_cmake_args.sh
  cmake -S . -B build-multi -G Ninja -DCMAKE_BUILD_TYPE=Release -DSHARDLM_CUDA=ON -DSHARDLM_NCCL=ON -DSHARDLM_MPI=ON \
    -DSHARDLM_BENCH=OFF -DSHARDLM_DEPS_DIR="$PWD/build-gpu-deps" \
    "${mpi_args[@]}" >"$R/cmake.log" 2>&1 || { tail -30 "$R/cmake.log"; save; exit 1; }
  grep -E "NCCL|MPI" "$R/cmake.log" | head -4
  cuda_tests=()
  [ "${CUDA_TESTS:-0}" = 1 ] && cuda_tests=(test_cuda_ops test_cuda_pack test_golden test_golden_cuda)
  timeout -k 5 "$(step_timeout 300 60)" ninja -C build-multi -j"$(nproc)" shardlm nccl_collectives nccl_golden_worker \
    test_nccl "${cuda_tests[@]}" >"$R/build.log" 2>&1 || { grep -E "error" -A3 "$R/build.log" | head -60; say "BUILD FAILED"; save; exit 1; }
  say "build: $(elapsed) s"
fi
save
if [ "${CUDA_TESTS:-0}" = 1 ]; then
  for t in test_cuda_ops test_cuda_pack test_golden test_golden_cuda; do
    exe=$(find build-multi/tests -name "$t" -type f -perm -u+x | head -1)
    tt=$(step_timeout 120 20) || { say "$t: SKIPPED (time)"; continue; }
    ts=$(date +%s)
    timeout -k 5 "$tt" "$exe" >"$R/$t.log" 2>&1
    say "$t rc=$? in $(($(date +%s) - ts)) s: $(grep -E "^\[  (PASSED|FAILED|SKIPPED) " "$R/$t.log" | tr '\n' ' ')"
    grep -E "^\[  FAILED|Failure|Expected|Which is" "$R/$t.log" | head -12 | tee -a "$SUMMARY"
  done
  save
fi

# ---- 2. test_nccl, the 4-rank NCCL latency, golden ids under more layouts
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  if t=$(step_timeout 200 60); then
    ts=$(date +%s)
    timeout -k 5 "$t" build-multi/tests/nccl/test_nccl >"$R/test_nccl.log" 2>&1
    say "test_nccl rc=$? in $(($(date +%s) - ts)) s"
    reap
    grep -E "^\[  (FAILED|PASSED|SKIPPED) |^\[       OK|Failure|Expected|Which is|worst|KB all-reduce|all-reduce path|did not arrive|has not completed" \
      "$R/test_nccl.log" | grep -v "^\[       OK" | head -50 | tee -a "$SUMMARY"
    grep -cE "^\[       OK" "$R/test_nccl.log" | sed 's/^/tests OK: /' | tee -a "$SUMMARY"
  else
    say "test_nccl: SKIPPED (time)"
  fi
  save
  if [ "$n_gpu" -ge 4 ] && t=$(step_timeout 40 15); then
    timeout -k 5 "$t" mpirun --allow-run-as-root --oversubscribe --bind-to none -x NCCL_NVLS_ENABLE -x SHARDLM_ALLREDUCE=nccl \
      -np 4 build-multi/tests/nccl/nccl_collectives >"$R/collectives-np4-nccl.log" 2>&1
    say "nccl_collectives np 4 nccl rc=$?"
    grep -E "KB all-reduce|MPI host|FAILED|ALL PASSED" "$R/collectives-np4-nccl.log" | tee -a "$SUMMARY"
    reap
  fi
  save
fi
if [ "${SKIP_GOLD:-0}" != 1 ]; then
  # Greedy ids of layouts test_nccl does not cover, against one GPU, on the converted golden model.
  G=${GOLD_MODEL:-build-multi/test-stories260K.gguf}
  if [ -f "$G" ]; then
    gold() {  # name, then layout flags
      local name=$1 t
      shift
      t=$(step_timeout 40 15) || { say "golden $name: SKIPPED (time)"; return; }
      timeout -k 5 "$t" "$BIN" generate --backend "$BACKEND" -m "$G" --prompt-ids 1,403,407,261,365 -n 48 --greedy \
        --ignore-eos --json -q --kv-type f32 "$@" >"$R/gold-$name.json" 2>"$R/gold-$name.err"
      local rc=$?
      reap
      python3 - "$R/gold-${GREF:-1gpu}.json" "$R/gold-$name.json" "$name" "$rc" "${GLABEL:-stories260K}" <<'EOF' | tee -a "$SUMMARY"
import json, sys
ref, got, name, rc, label = sys.argv[1:]
try:
    a = json.load(open(ref))["generated_ids"]; b = json.load(open(got))["generated_ids"]
    print("golden %s %-22s %s (%d ids)" % (label, name, "SAME ids as 1 GPU" if a == b else "DIFFERENT ids: %s vs %s" % (b, a), len(b)))
except Exception as e:
    print("golden stories260K %-22s FAILED rc=%s: %s" % (name, rc, open(got[:-5] + ".err").read()[-400:]))
EOF
    }
    timeout -k 5 40 "$BIN" generate --backend "$BACKEND" -m "$G" --prompt-ids 1,403,407,261,365 -n 48 --greedy --ignore-eos \
      --json -q --kv-type f32 >"$R/gold-1gpu.json" 2>"$R/gold-1gpu.err" || say "golden 1 GPU failed: $(tail -c 300 "$R/gold-1gpu.err")"
    # NCCL takes one rank per GPU in a communicator: tp 4 needs 4 GPUs (pp 4 does not).
    if [ "$n_gpu" -ge 4 ]; then gold tp4 --tp 4; else say "golden tp4: SKIPPED ($n_gpu GPUs)"; fi
    gold pp4 --pp 4
    gold pp2-split-4,1 --pp 2 --layer-split 4,1
    gold tp2-ngl2 --tp 2 --n-gpu-layers 2
    gold tp2-nographs --tp 2 --no-cuda-graphs
    # Greedy tokens kept on the device (the host enqueues each step before reading the one before).
    if [ "$n_gpu" -ge 4 ]; then SHARDLM_DEVICE_GREEDY=1 gold tp4-devgreedy --tp 4; fi
    SHARDLM_DEVICE_GREEDY=1 gold tp2-devgreedy-nographs --tp 2 --no-cuda-graphs
    SHARDLM_DEVICE_GREEDY=1 gold 1gpu-devgreedy
    # Quantized weights: the packed matvecs read the int8 row that the norm (fused into the all-reduce at
    # tp 2, unless SHARDLM_ALLREDUCE_FUSE says otherwise) writes. tiny-llama31's widths are multiples of 32.
    HF=tests/data/hf/tiny-llama31
    if "$BIN" convert --from hf "$HF" -o /tmp/tl31-q8_0.gguf --type q8_0 -q; then
      G=/tmp/tl31-q8_0.gguf
      GLABEL=tiny-llama31-q8_0
      GREF=q8-1gpu
      gold q8-1gpu
      gold q8-tp2 --tp 2
      SHARDLM_ALLREDUCE_FUSE=pdl gold q8-tp2-unfused --tp 2
      SHARDLM_ALLREDUCE_PUSH=0 gold q8-tp2-nopush --tp 2
      if [ "$n_gpu" -ge 4 ]; then gold q8-tp4 --tp 4; fi
      if [ "$n_gpu" -ge 4 ]; then SHARDLM_DEVICE_GREEDY=1 gold q8-tp4-devgreedy --tp 4; fi
      SHARDLM_DEVICE_GREEDY=1 gold q8-tp2-devgreedy --tp 2
      unset GREF GLABEL
    else
      say "golden tiny-llama31 q8_0: FAILED (converting $HF, a fixture of the tree)"
    fi
  else
    say "golden extra layouts: SKIPPED ($G missing: test_nccl did not convert it)"
  fi
  save
fi

# ---- 3. Llama-3.1-8B BF16 benches
summary() {  # json label
  python3 - "$1" "$2" <<'EOF' | tee -a "$SUMMARY"
import json, sys
path, label = sys.argv[1:]
try:
    d = json.load(open(path))
except Exception as e:
    err = path[:-5] + ".err"
    try: tail = open(err).read()[-600:]
    except Exception: tail = "?"
    print("%s: FAILED (%s)\n  %s" % (label, e.__class__.__name__, tail.replace("\n", "\n  ")))
    sys.exit(0)
# With -p 0 bench's "pp" is the pipeline size (an int), not the prefill test.
pp = d["pp"] if isinstance(d.get("pp"), dict) else {}
tg, pl = d.get("tg", {}), d.get("planner", {})
s = "%s: pp%s %.0f tok/s, tg%s %.1f tok/s, roofline %.1f tok/s (share %.1f%%), comm %.1f%%" % (
    label, pp.get("n_prompt", ""), pp.get("tokens_per_s", 0), tg.get("n_gen", ""), tg.get("tokens_per_s", 0),
    d["roofline_tokens_per_s"], 100 * tg.get("roofline_share", 0), 100 * tg.get("comm_share", 0))
if tg.get("tokens_on_device"):
    s += ", greedy tokens on the device"
if "decode_tokens_per_s" in pl:
    s += "; planner tg %.1f (x%.3f), pp %.0f (x%.3f)" % (pl["decode_tokens_per_s"], pl.get("tg_measured_over_predicted", 0),
                                                     pl["prefill_tokens_per_s"], pl.get("pp_measured_over_predicted", 0))
else:
    s += "; planner: " + pl.get("basis", "?")
print(s)
G = 2.0 ** 30
for r in d.get("ranks", []):
    used = r.get("device_used_bytes")
    print("  rank %d (tp %d pp %d, layers %d..%d): weights %.2f GiB, allocated %.2f GiB, planned %.2f GiB (x%.3f); "
          "device in use %s GiB, planned + reserve %.2f GiB (x%s); comm %.1f%%" % (
        r["rank"], r["tp_rank"], r["pp_rank"], r["layers"][0], r["layers"][1] - 1, r["weight_bytes"] / G,
        r["backend_allocated_bytes"] / G, r.get("planned_bytes", 0) / G, r.get("allocated_over_planned", 0),
        "?" if used is None else "%.2f" % (used / G),
        (r.get("planned_bytes", 0) + r.get("planned_reserve_bytes", 0)) / G,
        "%.3f" % r["device_used_over_planned_with_reserve"] if "device_used_over_planned_with_reserve" in r else "-",
        100 * r["comm_share"]))
print("  backend %s; device all-reduce: %s; bandwidth %.0f GB/s (%s)" % (d["backend"], d.get("device_all_reduce") or "-",
      d["bandwidth_bytes_per_s"] / 1e9, d["bandwidth_source"]))
EOF
}
# bench NAME ALLREDUCE WANT_S MIN_S args... (only names matching the regex $BENCHES, default all); a
# tensor-parallel bench runs once per value in $FUSE_AB. With ENV_AB (space-separated NAME:VAR=VALUE,VAR=VALUE
# variants, e.g. "base:SHARDLM_CUDA_MV_PREFETCH_MB=0 pf8:SHARDLM_CUDA_MV_PREFETCH_MB=8"), the benches whose
# names match AB_BENCHES (a regex, default: all) run once per variant, AB_ROUNDS times (default 1), the
# variants interleaved within each round.
bench() {
  local name=$1 ar=$2 want=$3 min=$4 t f v round fuses=("") variants=(":") rounds=1
  shift 4
  [[ "$name" =~ ${BENCHES:-.} ]] || return 0
  [[ -n "${FUSE_AB:-}" && " $* " == *" --tp "* ]] && read -r -a fuses <<<"$FUSE_AB"
  if [[ -n "${ENV_AB:-}" && "$name" =~ ${AB_BENCHES:-.} ]]; then
    read -r -a variants <<<"$ENV_AB"
    rounds=${AB_ROUNDS:-1}
  fi
  for round in $(seq 1 "$rounds"); do
    for v in "${variants[@]}"; do
      local vname=${v%%:*} envs=()
      IFS=, read -r -a envs <<<"${v#*:}"
      for f in "${fuses[@]}"; do
        local nm=$name${f:+-fuse-$f}${vname:+-$vname}
        [ "$rounds" -gt 1 ] && nm=$nm-r$round
        t=$(step_timeout "$want" "$min") || { say "$nm: SKIPPED (time, $(left) s left)"; return 1; }
        local ts=$(date +%s)
        env "${envs[@]}" SHARDLM_ALLREDUCE=$ar SHARDLM_ALLREDUCE_FUSE=$f timeout -k 10 "$t" "$BIN" bench \
          --backend "$BACKEND" -q --json "$@" >"$R/$nm.json" 2>"$R/$nm.err"
        local rc=$?
        reap
        summary "$R/$nm.json" "$nm [rc $rc, $(($(date +%s) - ts)) s, SHARDLM_ALLREDUCE=$ar${f:+ SHARDLM_ALLREDUCE_FUSE=$f}${envs[*]:+ ${envs[*]}}]"
        save
      done
    done
  done
}

if [ "$GEN8" = 1 ] && t=$(step_timeout 120 40); then
  ts=$(date +%s)
  timeout -k 5 "$t" "$BIN" gen-model --arch llama-3.1-8b --type bf16 -o "$M8" -q || say "gen-model 8B failed"
  say "gen-model llama-3.1-8b bf16: $(($(date +%s) - ts)) s, $(du -h "$M8" 2>/dev/null | cut -f1)"
fi
if [ -f "$M8" ]; then
  B8=(-m "$M8" -p "${P8:-512}" -n "${N8:-128}" -r "${R8:-3}" --kv-type f16)
  bench 8b-tp1 auto 90 25 "${B8[@]}"
  [ "$n_gpu" -ge 2 ] && bench 8b-tp2-oneshot oneshot 90 25 "${B8[@]}" --tp 2
  [ "$n_gpu" -ge 2 ] && bench 8b-tp2-nccl nccl 90 25 "${B8[@]}" --tp 2
  [ "$n_gpu" -ge 4 ] && bench 8b-tp4-oneshot oneshot 90 25 "${B8[@]}" --tp 4
  [ "$n_gpu" -ge 4 ] && bench 8b-tp4-nccl nccl 90 25 "${B8[@]}" --tp 4
  [ "$n_gpu" -ge 2 ] && bench 8b-pp2 auto 90 25 "${B8[@]}" --pp 2
  [ "$n_gpu" -ge 4 ] && bench 8b-pp4 auto 90 25 "${B8[@]}" --pp 4
  [ "$n_gpu" -ge 4 ] && bench 8b-tp2xpp2 auto 90 25 "${B8[@]}" --tp 2 --pp 2

  # ---- 5 (run here while the 8B file exists). A rank killed mid-run: rank 1 of a tp 2 generate gets
  # SIGKILL after loading; how long rank 0 (and the whole command) takes to end, and what it says.
  if [ "${SKIP_KILL:-0}" != 1 ] && [ "$n_gpu" -ge 2 ] && t=$(step_timeout 90 40); then
    rm -f "$R/kill.out" "$R/kill.err" "$R/kill.rc"
    ts=$(date +%s.%N)
    (timeout -k 5 "$t" "$BIN" generate --backend "$BACKEND" -m "$M8" --tp 2 --prompt-ids 1,2,3 $KILL_ARGS --greedy --ignore-eos \
      --kv-type f16 --comm-timeout 20 >"$R/kill.out" 2>"$R/kill.err"; echo $? >"$R/kill.rc") &
    bg=$!
    for _ in $(seq 1 600); do  # loaded = rank 0 printed "loading done"
      grep -q "loading done" "$R/kill.err" 2>/dev/null && break
      [ -f "$R/kill.rc" ] && break
      sleep 0.1
    done
    sleep 2  # decoding now
    r0=""; r1=""
    for p in $(pgrep -f "$BIN generate"); do
      rk=$(tr '\0' '\n' <"/proc/$p/environ" 2>/dev/null | sed -n 's/^OMPI_COMM_WORLD_RANK=//p')
      [ "$rk" = 0 ] && r0=$p
      [ "$rk" = 1 ] && r1=$p
    done
    if [ -n "$r1" ] && [ -n "$r0" ]; then
      tk=$(date +%s.%N)
      kill -9 "$r1"
      r0_gone=""
      for _ in $(seq 1 600); do
        kill -0 "$r0" 2>/dev/null || { r0_gone=$(date +%s.%N); break; }
        sleep 0.1
      done
      wait "$bg"
      tend=$(date +%s.%N)
      say "killed rank: SIGKILL to rank 1 (pid $r1) $(python3 -c "print('%.1f' % ($tk - $ts))") s after start;" \
        "rank 0 (pid $r0) gone after $( [ -n "$r0_gone" ] && python3 -c "print('%.2f s' % ($r0_gone - $tk))" || echo 'NOT within 60 s')," \
        "the command after $(python3 -c "print('%.2f' % ($tend - $tk))") s, exit status $(cat "$R/kill.rc" 2>/dev/null)"
      say "  tokens printed before: $(wc -c <"$R/kill.out") bytes; stderr (last lines):"
      grep -v "^loading" "$R/kill.err" | tail -8 | sed 's/^/    /' | tee -a "$SUMMARY"
      command -v nvidia-smi >/dev/null &&
        say "  GPU memory in use afterwards: $(nvidia-smi --query-gpu=index,memory.used --format=csv,noheader | tr '\n' ';')"
    else
      say "killed rank: could not find the ranks (r0='$r0' r1='$r1'); stderr: $(tail -c 400 "$R/kill.err")"
      kill "$bg" 2>/dev/null
      wait "$bg" 2>/dev/null
    fi
    reap
    save
  else
    say "killed rank: SKIPPED (time or GPUs)"
  fi
  [ "$GEN8" = 1 ] && rm -f "$M8"
fi

# ---- 4. Llama-3.1-70B (sparse files: metadata and a hole of zeros, no disk or synthesis time)
if [ "${SKIP_70B:-0}" != 1 ] && [ "$n_gpu" -ge 2 ]; then
  gen70() {  # type
    local t ts
    t=$(step_timeout 120 30) || { say "gen-model 70B $1: SKIPPED (time)"; return 1; }
    ts=$(date +%s)
    timeout -k 5 "$t" "$BIN" gen-model --arch llama-3.1-70b --type "$1" --sparse -o /tmp/m70.gguf -q || { say "gen-model 70B $1 failed"; return 1; }
    say "gen-model llama-3.1-70b $1 --sparse: $(($(date +%s) - ts)) s, $(ls -l /tmp/m70.gguf | awk '{printf "%.1f GB", $5/1e9}')"
  }
  if gen70 q4_0; then
    [ "$n_gpu" -ge 4 ] && bench 70b-q4_0-tp4 auto 150 60 -m /tmp/m70.gguf -p "${P70:-512}" -n 64 -r 2 --kv-type f16 --tp 4
    bench 70b-q4_0-tp2 auto 150 60 -m /tmp/m70.gguf -p "${P70:-512}" -n 64 -r 2 --kv-type f16 --tp 2
    rm -f /tmp/m70.gguf
  fi
  if [ "${SKIP_70B_EXTRA:-0}" != 1 ] && gen70 q8_0; then
    bench 70b-q8_0-tp2 auto 150 70 -m /tmp/m70.gguf -p 0 -n 16 -r 1 --kv-type f16 --tp 2
    rm -f /tmp/m70.gguf
  fi
  if [ "${SKIP_70B_EXTRA:-0}" != 1 ] && [ "$n_gpu" -ge 4 ] && gen70 bf16; then
    bench 70b-bf16-tp4 auto 150 80 -m /tmp/m70.gguf -p 0 -n 16 -r 1 --kv-type f16 --tp 4
    rm -f /tmp/m70.gguf
  fi
fi
say "== total $(elapsed) s"
save
