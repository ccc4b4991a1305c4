#!/usr/bin/python3
"""Writes tests/data/quant/aidreams-w256-f16.gguf: the bundled trained model (models/aidreams260K.gguf, dim 64)
embedded exactly into a model whose every matrix row is a multiple of 256, so that every GGUF weight type,
K-quants and IQ types included, applies to every tensor without fallbacks, on a model whose perplexity on
real text means something (a random model's is flat, where quantization barely shows).

The embedding is exact up to rounding: n_embd 64 -> 256, head_dim 16 -> 64, n_ff 172 -> 256, zeros in the
new rows and columns, so the residual stream keeps zeros in its new dimensions. What the zeros change is
compensated in the weights and metadata:
- RMSNorm averages over 256 instead of 64 dimensions: mean(x^2) is 4x smaller, so the norm weights are halved
  and eps is divided by 4 (x / sqrt(s/256 + eps/4) * w/2 = x / sqrt(s/64 + eps) * w).
- Attention scores are scaled by 1/sqrt(64) instead of 1/sqrt(16): the query weights are doubled.
- RoPE: the real dimensions are the first 8 adjacent pairs of each 64-wide head; with freq_base 10000^4 their
  frequencies base^(-2i/64) equal the original 10000^(-2i/16). The zero pairs rotate zeros.
The file is F16 (norms F32), as llama.cpp's converter writes; uses gguf-py (llama.cpp's GGUF writer).

  scripts/make_aidreams_w256.py LLAMA_CPP_TARBALL
"""
import os
import sys
import tarfile
import tempfile

import numpy as np

D, HD, FF = 256, 64, 256  # padded n_embd, head_dim, n_ff


def main():
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} LLAMA_CPP_TARBALL")
    here = os.path.dirname(os.path.abspath(__file__))
    src = os.path.join(here, "..", "models", "aidreams260K.gguf")
    dst = os.path.join(here, "..", "tests", "data", "quant", "aidreams-w256-f16.gguf")
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(sys.argv[1]) as tar:
            tar.extractall(tmp, members=[m for m in tar.getmembers() if "gguf-py/gguf/" in m.name])
        root = next(os.path.join(d, "gguf-py") for d, subdirs, _ in os.walk(tmp) if "gguf-py" in subdirs)
        sys.path.insert(0, root)
        import gguf
        from gguf.gguf_reader import GGUFReader

        r = GGUFReader(src)

        def field(name):
            f = r.fields[name]
            if f.types[0] == gguf.GGUFValueType.ARRAY:
                if f.types[1] == gguf.GGUFValueType.STRING:
                    return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
                return [f.parts[i][0].item() for i in f.data]
            if f.types[0] == gguf.GGUFValueType.STRING:
                return bytes(f.parts[f.data[0]]).decode("utf-8")
            return f.parts[f.data[0]][0].item()

        d0 = field("llama.embedding_length")
        n_head = field("llama.attention.head_count")
        n_head_kv = field("llama.attention.head_count_kv")
        hd0 = d0 // n_head
        ff0 = field("llama.feed_forward_length")
        n_layer = field("llama.block_count")
        eps = field("llama.attention.layer_norm_rms_epsilon")
        base = field("llama.rope.freq_base")
        assert n_head * HD == D and n_head_kv * HD == D, "padded heads must fill n_embd"
        tensors = {t.name: np.array(t.data, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])
                   for t in r.tensors}

        def pad_heads(w, n_h):  # (n_h*hd0, d0) -> (n_h*HD, D): each head's rows padded to HD
            out = np.zeros((n_h, HD, D), np.float32)
            out[:, :hd0, :d0] = w.reshape(n_h, hd0, d0)
            return out.reshape(n_h * HD, D)

        def pad_out_heads(w):  # attn_output (d0, n_head*hd0) -> (D, n_head*HD)
            out = np.zeros((D, n_head, HD), np.float32)
            out[:d0, :, :hd0] = w.reshape(d0, n_head, hd0)
            return out.reshape(D, n_head * HD)

        def pad2(w, rows, cols):
            out = np.zeros((rows, cols), np.float32)
            out[:w.shape[0], :w.shape[1]] = w
            return out

        def pad1(w, n):
            out = np.zeros(n, np.float32)
            out[:w.shape[0]] = w
            return out

        w = gguf.GGUFWriter(dst, "llama")
        w.add_name("aidreams260K-w256 (aidreams260K embedded in 256-wide rows)")
        w.add_context_length(field("llama.context_length"))
        w.add_embedding_length(D)
        w.add_block_count(n_layer)
        w.add_feed_forward_length(FF)
        w.add_head_count(n_head)
        w.add_head_count_kv(n_head_kv)
        w.add_key_length(HD)
        w.add_value_length(HD)
        w.add_layer_norm_rms_eps(eps / 4)
        w.add_rope_freq_base(float(base) ** (HD / hd0))
        w.add_rope_dimension_count(HD)
        w.add_vocab_size(field("llama.vocab_size"))
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
        w.add_tokenizer_model(field("tokenizer.ggml.model"))
        w.add_token_list(field("tokenizer.ggml.tokens"))
        w.add_token_scores(field("tokenizer.ggml.scores"))
        w.add_token_types(field("tokenizer.ggml.token_type"))
        w.add_bos_token_id(field("tokenizer.ggml.bos_token_id"))
        w.add_eos_token_id(field("tokenizer.ggml.eos_token_id"))
        w.add_unk_token_id(field("tokenizer.ggml.unknown_token_id"))
        w.add_add_bos_token(bool(field("tokenizer.ggml.add_bos_token")))
        w.add_add_eos_token(bool(field("tokenizer.ggml.add_eos_token")))
        w.add_add_space_prefix(bool(field("tokenizer.ggml.add_space_prefix")))

        f16 = lambda a: a.astype(np.float16)
        w.add_tensor("token_embd.weight", f16(pad2(tensors["token_embd.weight"], tensors["token_embd.weight"].shape[0], D)))
        for i in range(n_layer):
            b = f"blk.{i}."
            w.add_tensor(b + "attn_norm.weight", pad1(tensors[b + "attn_norm.weight"], D) / 2)
            w.add_tensor(b + "attn_q.weight", f16(2 * pad_heads(tensors[b + "attn_q.weight"], n_head)))
            w.add_tensor(b + "attn_k.weight", f16(pad_heads(tensors[b + "attn_k.weight"], n_head_kv)))
            w.add_tensor(b + "attn_v.weight", f16(pad_heads(tensors[b + "attn_v.weight"], n_head_kv)))
            w.add_tensor(b + "attn_output.weight", f16(pad_out_heads(tensors[b + "attn_output.weight"])))
            w.add_tensor(b + "ffn_norm.weight", pad1(tensors[b + "ffn_norm.weight"], D) / 2)
            w.add_tensor(b + "ffn_gate.weight", f16(pad2(tensors[b + "ffn_gate.weight"], FF, D)))
            w.add_tensor(b + "ffn_up.weight", f16(pad2(tensors[b + "ffn_up.weight"], FF, D)))
            w.add_tensor(b + "ffn_down.weight", f16(pad2(tensors[b + "ffn_down.weight"], D, FF)))
        w.add_tensor("output_norm.weight", pad1(tensors["output_norm.weight"], D) / 2)
        if "output.weight" in tensors:
            w.add_tensor("output.weight", f16(pad2(tensors["output.weight"], tensors["output.weight"].shape[0], D)))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    print("wrote", os.path.normpath(dst), f"({d0}->{D}, head_dim {hd0}->{HD}, n_ff {ff0}->{FF})")


if __name__ == "__main__":
    main()
