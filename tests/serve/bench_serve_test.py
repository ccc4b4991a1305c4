#!/usr/bin/env python3
"""CTest: scripts/bench_serve.py against a real `shardlm serve` (bundled model): every request completes, the
token counts are exact (token-id prompts of --input-len, --output-len tokens each with ignore_eos), the latency
figures are ordered (p50 <= p90 <= p99), and the JSON file holds what the text says.
   bench_serve_test.py SHARDLM_BIN MODEL BENCH_SERVE_PY OUT_DIR"""
import json
import os
import re
import signal
import subprocess
import sys

shardlm, model, bench, out_dir = sys.argv[1:5]
srv = subprocess.Popen([shardlm, "serve", "-m", model, "--host", "127.0.0.1", "--port", "0", "--max-num-seqs", "8",
                        "-t", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
try:
    port = None
    for line in srv.stdout:
        m = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if m:
            port = m.group(1)
            break
    assert port, "the server did not start: " + srv.stderr.read()
    out = os.path.join(out_dir, f"bench-serve-{os.getpid()}.json")
    r = subprocess.run([sys.executable, bench, "--url", f"http://127.0.0.1:{port}", "-n", "24", "--concurrency", "8",
                        "--input-len", "16", "--output-len", "20", "--prompt-ids-vocab", "512", "--json", out],
                       capture_output=True, text=True, timeout=240)
    print(r.stdout, r.stderr)
    assert r.returncode == 0, f"bench_serve exited {r.returncode}"
    j = json.load(open(out))
    os.remove(out)
    assert j["completed"] == 24 and j["failed"] == 0, j
    assert j["output_tokens"] == 24 * 20, j["output_tokens"]
    assert j["input_tokens"] == 24 * 16, j["input_tokens"]
    for k in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
        assert 0 < j[k]["p50"] <= j[k]["p90"] <= j[k]["p99"], (k, j[k])
    assert j["ttft_ms"]["p50"] < j["e2e_ms"]["p50"]
    assert f"output {j['output_throughput']:.1f} tokens/s" in r.stdout
    print("ok")
finally:
    srv.send_signal(signal.SIGTERM)
    srv.wait(timeout=60)
