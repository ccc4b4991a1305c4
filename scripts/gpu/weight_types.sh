#!/usr/bin/env bash
# Every GGUF weight type on one GPU: the CUDA kernel tests of the new types, then `shardlm perplexity
# --backend cuda` on the aidreams-w256 files of tests/data/quant/ (each llama-quantize scheme written by
# `shardlm convert`, and llama-quantize's pure IQ/MXFP4 files) against llama-perplexity's recorded CPU figures
# (tests/data/quant/llama_quant_types.json). Run on the GPU machine from the repository root with OUT set:
#   bash scripts/gpu/weight_types.sh
set -uo pipefail
export NCCL_NVLS_ENABLE=0
source scripts/gpu/build_dev.sh
build_dev shardlm test_cuda_weight_types test_cuda_ops
run_tests build-dev/tests/cuda/test_cuda_weight_types build-dev/tests/cuda/test_cuda_ops
python3 - <<'PY'
import json, subprocess
j = json.load(open("tests/data/quant/llama_quant_types.json"))
bin = "build-dev/apps/shardlm/shardlm"
base = "tests/data/quant/aidreams-w256-f16.gguf"
def ppl(model):
    r = subprocess.run([bin, "perplexity", "--backend", "cuda", "-m", model, "-f", "tests/data/text/fsf-licenses.txt",
                        "-c", "128", "--chunks", str(j["chunks"]), "-q"], capture_output=True, text=True)
    line = [l for l in r.stdout.splitlines() if "Final estimate" in l]
    return float(line[0].split()[4]) if line else float("nan")
rows = [("f16", base, j["base"]["ppl"])]
for s in j["schemes"]:
    out = f"/tmp/w256-{s['scheme']}.gguf"
    subprocess.run([bin, "convert", "--from", "gguf", base, "--type", s["scheme"], "-o", out, "-q"], check=True)
    rows.append((s["scheme"], out, s["ppl"]))
for p in j["pure"]:
    rows.append((p["type"], p["model"], p["ppl"]))
worst = 0
for name, model, want in rows:
    got = ppl(model)
    d = 100 * (got / want - 1)
    worst = max(worst, abs(d))
    print(f"{name:8s} cuda PPL {got:.4f}  llama.cpp CPU {want:.4f}  {d:+.3f}%")
print(f"worst {worst:.3f}%")
PY
