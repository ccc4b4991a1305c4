#!/usr/bin/env python3
"""bench-serve: replays completion requests against any OpenAI-compatible server (shardlm serve, llama-server,
vllm serve) and reports throughput and latency, as text and JSON. Python 3 standard library only, so it runs on
the GPU machines and CI as it is.

  scripts/bench_serve.py --url http://127.0.0.1:8080 -n 512 --concurrency 64 --input-len 128 --output-len 128 \
      --prompt-ids-vocab 32000 [--json out.json]

Requests are streamed (server-sent events), so that the time to first token (TTFT) and the gaps between tokens
(ITL) are seen as a client sees them. Prompts: with --prompt-ids-vocab V, each prompt is --input-len random
token ids below V (exact lengths on every server that takes token-id prompts, as OpenAI's API allows); else a
text of about --input-len words; or --jsonl FILE with one {"prompt": ..., "max_tokens": N} per line. Every
request sets max_tokens (--output-len) and ignore_eos, so output lengths are fixed. Load: --concurrency C
clients each sending its next request when the last one ended, or --request-rate R requests per second
(Poisson arrivals, unbounded concurrency).

Output tokens are counted from the server's usage (stream_options.include_usage) when it sends one, else from
the number of streamed chunks that carried text. Exit status: 0 when every request succeeded, 1 otherwise.
"""
import argparse
import http.client
import json
import random
import statistics
import sys
import threading
import time
import urllib.parse

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly judge its boxing form and "
         "every sphinx of black quartz hears the vow").split()


def percentile(values, p):
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def build_requests(a):
    rng = random.Random(a.seed)
    reqs = []
    if a.jsonl:
        with open(a.jsonl, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    j = json.loads(line)
                except json.JSONDecodeError as e:
                    sys.exit(f"bench_serve: {a.jsonl}:{n}: not JSON: {e}")
                if "prompt" not in j:
                    sys.exit(f"bench_serve: {a.jsonl}:{n}: no 'prompt' field")
                reqs.append({"prompt": j["prompt"], "max_tokens": int(j.get("max_tokens", a.output_len))})
        if not reqs:
            sys.exit(f"bench_serve: {a.jsonl} holds no prompts")
        while len(reqs) < a.num_prompts:  # cycle through the file
            reqs.append(dict(reqs[len(reqs) % len(reqs)]))
        return reqs[: a.num_prompts]
    for _ in range(a.num_prompts):
        if a.prompt_ids_vocab:
            # Ids from 10 up: the first ids of most vocabularies are control tokens.
            prompt = [rng.randrange(10, a.prompt_ids_vocab) for _ in range(a.input_len)]
        else:
            prompt = " ".join(rng.choice(WORDS) for _ in range(a.input_len))
        reqs.append({"prompt": prompt, "max_tokens": a.output_len})
    return reqs


class Client:
    def __init__(self, a):
        u = urllib.parse.urlparse(a.url)
        if u.scheme not in ("http", "https"):
            sys.exit(f"bench_serve: --url {a.url}: expected http://HOST:PORT")
        self.https = u.scheme == "https"
        self.host = u.hostname
        self.port = u.port or (443 if self.https else 80)
        self.prefix = u.path.rstrip("/")
        if not self.prefix.endswith("/v1"):
            self.prefix += "/v1"
        self.headers = {"Content-Type": "application/json"}
        if a.api_key:
            self.headers["Authorization"] = f"Bearer {a.api_key}"
        self.timeout = a.timeout

    def conn(self):
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout)

    def model(self):
        c = self.conn()
        c.request("GET", self.prefix + "/models", headers=self.headers)
        r = c.getresponse()
        body = r.read()
        if r.status != 200:
            sys.exit(f"bench_serve: GET {self.prefix}/models: HTTP {r.status}: {body[:200]!r}")
        data = json.loads(body).get("data") or []
        if not data:
            sys.exit("bench_serve: the server lists no model; pass --model")
        return data[0]["id"]

    def stream(self, body):
        """One streamed completion; returns a dict of timings and counts."""
        out = {"ok": False, "ttft": None, "itl": [], "output_tokens": 0, "prompt_tokens": None, "error": None}
        t0 = time.perf_counter()
        try:
            c = self.conn()
            c.request("POST", self.prefix + "/completions", body=json.dumps(body), headers=self.headers)
            r = c.getresponse()
            if r.status != 200:
                out["error"] = f"HTTP {r.status}: {r.read()[:300]!r}"
                return out
            chunks, usage, last = 0, None, None
            buf = b""
            while True:
                line = r.readline()
                if not line:
                    break
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                j = json.loads(data)
                if j.get("usage"):
                    usage = j["usage"]
                choices = j.get("choices") or []
                if choices and (choices[0].get("text") or choices[0].get("delta", {}).get("content")):
                    now = time.perf_counter()
                    if out["ttft"] is None:
                        out["ttft"] = now - t0
                    else:
                        out["itl"].append(now - last)
                    last = now
                    chunks += 1
            del buf
            out["e2e"] = time.perf_counter() - t0
            out["output_tokens"] = usage["completion_tokens"] if usage else chunks
            out["prompt_tokens"] = usage.get("prompt_tokens") if usage else None
            out["ok"] = out["ttft"] is not None
            if not out["ok"]:
                out["error"] = "no token came back"
        except Exception as e:  # a refused connection, a timeout, a malformed event
            out["error"] = f"{type(e).__name__}: {e}"
        return out


def main():
    p = argparse.ArgumentParser(description="Throughput and latency of an OpenAI-compatible completions server.")
    p.add_argument("--url", default="http://127.0.0.1:8080", help="server base URL (default %(default)s)")
    p.add_argument("--model", help="model name (default: the first of GET /v1/models)")
    p.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("-n", "--num-prompts", type=int, default=200, help="requests to send (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=16, help="clients sending at once (default %(default)s)")
    p.add_argument("--request-rate", type=float, default=0.0,
                   help="requests per second, Poisson arrivals, instead of --concurrency (default: off)")
    p.add_argument("--input-len", type=int, default=128, help="prompt length in tokens/words (default %(default)s)")
    p.add_argument("--output-len", type=int, default=128, help="max_tokens of each request (default %(default)s)")
    p.add_argument("--prompt-ids-vocab", type=int, default=0,
                   help="send prompts of --input-len random token ids below this (default: text prompts)")
    p.add_argument("--jsonl", help="prompts from a file of {\"prompt\": ..., \"max_tokens\": N} lines")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt generator (default %(default)s)")
    p.add_argument("--timeout", type=float, default=600, help="seconds one request may take (default %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="requests sent and not counted first (default %(default)s)")
    p.add_argument("--json", dest="json_out", help="also write the results as JSON to this file ('-': stdout)")
    a = p.parse_args()
    for name in ("num_prompts", "concurrency", "input_len", "output_len"):
        if getattr(a, name) < 1:
            sys.exit(f"bench_serve: --{name.replace('_', '-')} {getattr(a, name)} must be >= 1")
    if a.request_rate < 0:
        sys.exit(f"bench_serve: --request-rate {a.request_rate} must be >= 0")
    if a.prompt_ids_vocab and a.prompt_ids_vocab <= 10:
        sys.exit(f"bench_serve: --prompt-ids-vocab {a.prompt_ids_vocab} must be > 10")

    client = Client(a)
    model = a.model or client.model()
    reqs = build_requests(a)

    def body(r):
        return {"model": model, "prompt": r["prompt"], "max_tokens": r["max_tokens"], "temperature": a.temperature,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}

    for _ in range(a.warmup):
        w = client.stream(body(reqs[0]))
        if not w["ok"]:
            sys.exit(f"bench_serve: the warm-up request failed: {w['error']}")

    results = [None] * len(reqs)
    lock = threading.Lock()
    nxt = [0]

    def worker():
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= len(reqs):
                return
            results[i] = client.stream(body(reqs[i]))

    t0 = time.perf_counter()
    if a.request_rate > 0:
        rng = random.Random(a.seed + 1)
        threads = []
        for i in range(len(reqs)):
            def one(i=i):
                results[i] = client.stream(body(reqs[i]))
            t = threading.Thread(target=one)
            t.start()
            threads.append(t)
            time.sleep(rng.expovariate(a.request_rate))
        for t in threads:
            t.join()
        load = f"request rate {a.request_rate}/s"
    else:
        threads = [threading.Thread(target=worker) for _ in range(min(a.concurrency, len(reqs)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        load = f"concurrency {a.concurrency}"
    duration = time.perf_counter() - t0

    ok = [r for r in results if r["ok"]]
    failed = [r for r in results if not r["ok"]]
    out_tokens = sum(r["output_tokens"] for r in ok)
    in_tokens = sum(r["prompt_tokens"] or 0 for r in ok)
    ttft = [r["ttft"] for r in ok]
    itl = [x for r in ok for x in r["itl"]]
    tpot = [(r["e2e"] - r["ttft"]) / (r["output_tokens"] - 1) for r in ok if r["output_tokens"] > 1]
    e2e = [r["e2e"] for r in ok]
    res = {
        "url": a.url, "model": model, "load": load, "num_prompts": len(reqs), "completed": len(ok),
        "failed": len(failed), "duration_s": duration, "input_tokens": in_tokens, "output_tokens": out_tokens,
        "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
    }
    for name, vals in (("ttft_ms", ttft), ("itl_ms", itl), ("tpot_ms", tpot), ("e2e_ms", e2e)):
        res[name] = {"mean": 1e3 * statistics.fmean(vals) if vals else float("nan"),
                     **{f"p{q}": 1e3 * percentile(vals, q) for q in (50, 90, 99)}}
    if failed:
        res["first_error"] = failed[0]["error"]

    print(f"== bench_serve: {a.url} model {model}, {len(reqs)} requests, {load}")
    print(f"completed {len(ok)}, failed {len(failed)} in {duration:.2f} s")
    print(f"input tokens {in_tokens}, output tokens {out_tokens}")
    print(f"request throughput {res['request_throughput']:.2f} req/s, output {res['output_throughput']:.1f} tokens/s, "
          f"total {res['total_token_throughput']:.1f} tokens/s")
    for name, label in (("ttft_ms", "TTFT"), ("itl_ms", "ITL"), ("tpot_ms", "TPOT"), ("e2e_ms", "E2E")):
        r = res[name]
        print(f"{label:5s} ms: mean {r['mean']:8.2f}  p50 {r['p50']:8.2f}  p90 {r['p90']:8.2f}  p99 {r['p99']:8.2f}")
    if failed:
        print(f"first error: {failed[0]['error']}")
    if a.json_out:
        text = json.dumps(res, indent=1)
        if a.json_out == "-":
            print(text)
        else:
            with open(a.json_out, "w", encoding="utf-8") as f:
                f.write(text + "\n")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
