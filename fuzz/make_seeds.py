#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets (fuzz/corpus/<target>/) and the dictionaries (fuzz/*.dict):
small valid inputs of each format, made here from the format specifications and the repository's fixtures, so
that the fuzzer starts from inputs that get past the first checks. Run from the repository root:
    fuzz/make_seeds.py
Corpora grown by longer runs are committed beside these seeds (file names are the inputs' SHA-1)."""
import json
import os
import struct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(ROOT, "fuzz", "corpus")


def put(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def gguf_str(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def gguf_kv(key, vtype, payload):
    return gguf_str(key) + struct.pack("<I", vtype) + payload


def gguf(n_layer=1, with_vocab=True, with_tensor=True):
    # GGUF v3: magic, version, tensor count, kv count, kvs, tensor infos, alignment padding, data.
    kvs = [gguf_kv("general.architecture", 8, gguf_str("llama")),
           gguf_kv("general.alignment", 4, struct.pack("<I", 32)),
           gguf_kv("llama.block_count", 4, struct.pack("<I", n_layer)),
           gguf_kv("llama.embedding_length", 4, struct.pack("<I", 32)),
           gguf_kv("llama.feed_forward_length", 4, struct.pack("<I", 64)),
           gguf_kv("llama.attention.head_count", 4, struct.pack("<I", 2)),
           gguf_kv("llama.attention.head_count_kv", 4, struct.pack("<I", 1)),
           gguf_kv("llama.context_length", 4, struct.pack("<I", 64)),
           gguf_kv("llama.rope.freq_base", 6, struct.pack("<f", 10000.0)),
           gguf_kv("llama.attention.layer_norm_rms_epsilon", 6, struct.pack("<f", 1e-5))]
    if with_vocab:
        toks = ["<unk>", "<s>", "</s>", "a", "b", "\u2581a"]
        kvs.append(gguf_kv("tokenizer.ggml.model", 8, gguf_str("llama")))
        kvs.append(gguf_kv("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, len(toks)) + b"".join(gguf_str(t) for t in toks)))
        kvs.append(gguf_kv("tokenizer.ggml.scores", 9, struct.pack("<IQ", 6, len(toks)) + struct.pack(f"<{len(toks)}f", *range(len(toks)))))
        kvs.append(gguf_kv("tokenizer.ggml.token_type", 9, struct.pack("<IQ", 5, len(toks)) + struct.pack(f"<{len(toks)}i", 2, 3, 3, 1, 1, 1)))
        kvs.append(gguf_kv("tokenizer.ggml.bos_token_id", 4, struct.pack("<I", 1)))
        kvs.append(gguf_kv("tokenizer.ggml.eos_token_id", 4, struct.pack("<I", 2)))
    tensors = []
    if with_tensor:
        tensors = [("token_embd.weight", [32, 6], 0, 0), ("output_norm.weight", [32], 0, 32 * 6 * 4)]
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs)
    for name, dims, ttype, off in tensors:
        head += gguf_str(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", ttype, off)
    head += b"\0" * ((32 - len(head) % 32) % 32)
    data = struct.pack("<192f", *[i / 100 for i in range(192)]) + struct.pack("<32f", *[1.0] * 32) if with_tensor else b""
    return head + data


def safetensors(entries, meta=None):
    header, data, off = {}, b"", 0
    for name, dtype, shape, raw in entries:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + len(raw)]}
        data += raw
        off += len(raw)
    if meta:
        header["__metadata__"] = meta
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def main():
    put("fuzz_gguf", "model", gguf())
    put("fuzz_gguf", "no-vocab", gguf(with_vocab=False))
    put("fuzz_gguf", "metadata-only", gguf(with_tensor=False))
    put("fuzz_safetensors", "two-tensors", safetensors(
        [("a.weight", "F32", [2, 2], struct.pack("<4f", 1, 2, 3, 4)), ("b", "BF16", [3], b"\0\x3f" * 3)], {"format": "pt"}))
    put("fuzz_safetensors", "index.json", json.dumps({"metadata": {"total_size": 10},
                                                      "weight_map": {"a.weight": "model-00001-of-00002.safetensors"}}))
    for m in ("tiny-llama31", "tiny-qwen2", "tiny-mistral"):
        with open(os.path.join(ROOT, "tests", "data", "hf", m, "config.json"), "rb") as f:
            put("fuzz_safetensors", m + "-config.json", f.read())
    with open(os.path.join(ROOT, "tests", "data", "tokenizers", "chat_templates.json")) as f:
        templates = json.load(f)
    msgs = json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": "Hello"}], "add_generation_prompt": True,
                       "bos_token": "<s>", "eos_token": "</s>"})
    for name, t in templates["templates"].items():
        t = t if isinstance(t, str) else json.dumps(t)
        for i, conv in enumerate(templates["conversations"][:2]):
            ctx = json.dumps({"messages": conv, "add_generation_prompt": True, "bos_token": "<s>", "eos_token": "</s>"})
            put("fuzz_chat_template", f"{name}-{i}", t.encode() + b"\0" + ctx.encode())
    put("fuzz_chat_template", "loops", "{% for m in messages %}{{ m.role|upper }}{% if loop.last %}!{% endif %}"
        "{% set x = namespace(n=0) %}{{ (m.content ~ '')[:3] }}{% endfor %}\0" + msgs)
    for i, text in enumerate(["Once upon a time", "h\u00e9llo w\u00f6rld \U0001F600 \u4f60\u597d", "<s>[INST] hi [/INST]",
                              "  leading spaces\n\ttabs\r\n", "\xff\xfe invalid utf8"]):
        for sel in (0, 1, 2, 3):
            put("fuzz_tokenizer", f"text-{i}-{sel}", bytes([sel | (16 * (i % 4))]) + text.encode("utf-8", "surrogateescape"))
    bodies = [{"model": "m", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0.7, "top_p": 0.9,
               "stop": ["\n", "end"], "logprobs": 2, "stream": True, "stream_options": {"include_usage": True}},
              {"prompt": [1, 2, 3], "max_tokens": 4, "presence_penalty": 0.5, "frequency_penalty": -0.5, "seed": 7},
              {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "logprobs": True,
               "top_logprobs": 3, "max_completion_tokens": 5},
              {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], "n": 1},
              {"tokens": [1, 2, 3]}, {"prompt": "x", "add_special_tokens": False}]
    for i, b in enumerate(bodies):
        put("fuzz_openai", f"body-{i}", json.dumps(b))
    # llama2.c: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size (negative: separate classifier),
    # seq_len, then the float32 weights of a tiny model.
    dim, hid, nl, nh, nkv, voc, seq = 8, 16, 1, 2, 1, 512, 16
    hd = dim // nh
    n = voc * dim + nl * (dim + dim * dim + 2 * dim * nkv * hd + dim * dim + dim + 3 * dim * hid) + dim + seq * hd
    put("fuzz_llama2c", "tiny", struct.pack("<7i", dim, hid, nl, nh, nkv, voc, seq) + struct.pack(f"<{n}f", *([0.01] * n)))
    with open(os.path.join(ROOT, "fuzz", "gguf.dict"), "w") as f:
        for k in ["GGUF", "general.architecture", "general.alignment", "llama.block_count", "llama.embedding_length",
                  "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.dimension_count",
                  "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                  "tokenizer.ggml.merges", "tokenizer.ggml.model", "tokenizer.ggml.pre", "token_embd.weight",
                  "blk.0.attn_q.weight", "output.weight", "qwen2", "gpt2"]:
            f.write(json.dumps(k) + "\n")
    with open(os.path.join(ROOT, "fuzz", "json.dict"), "w") as f:
        for k in ['"prompt"', '"messages"', '"role"', '"content"', '"max_tokens"', '"stream"', '"stop"', '"logprobs"',
                  '"top_logprobs"', '"temperature"', '"dtype"', '"shape"', '"data_offsets"', '"weight_map"',
                  '"__metadata__"', '"F32"', '"BF16"', '"hidden_size"', '"num_hidden_layers"', '"rope_scaling"',
                  "{", "}", "[", "]", ":", ",", "null", "true", "false", "-1", "1e308", '"\\u0000"',
                  "{%", "%}", "{{", "}}", "for", "endfor", "if", "endif", "set", "namespace", "loop"]:
            f.write(json.dumps(k) + "\n")


if __name__ == "__main__":
    main()
