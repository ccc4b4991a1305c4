// Hugging Face checkpoint directories (config.json + safetensors) as a ModelSource: tensors under GGUF
// names and ggml layouts, so they load, shard and run through the same path as GGUF files.
//
// A torch Linear weight [out, in] stored row-major is byte for byte a ggml tensor ne = {in, out}: only
// the shape is reversed. The one real change is RoPE: Hugging Face rotates the two halves of each head
// (rotate_half) while our model rotates adjacent pairs, so the rows of q_proj and k_proj (and their
// biases) are reordered per head, as llama.cpp's convert_hf_to_gguf.py `permute` does. Those tensors
// are owned copies; every other tensor stays in the mapping with its stored dtype (BF16, F16, F32).
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "loader/model_source.h"
#include "tokenizer/tokenizer.h"

namespace shardlm {

// `dir` holds config.json and model.safetensors or model.safetensors.index.json + shards. Throws Error
// naming the file and field/tensor for anything malformed, missing, unexpected or of the wrong shape.
std::unique_ptr<ModelSource> open_hf_model_source(const std::string& dir);

// GGUF name of a Hugging Face tensor name ("model.layers.3.mlp.up_proj.weight" -> "blk.3.ffn_up.weight"),
// or "" when the name is not one of the Llama/Mistral/Qwen2 weights.
std::string hf_to_gguf_name(const std::string& hf_name);

// Whether q/k rows of this arch are permuted from rotate-half to adjacent pairs. True for every arch we
// load, because the model's RoPE op rotates adjacent pairs only. (llama.cpp keeps Qwen2's q/k unpermuted
// and rotates halves instead - "NEOX" - so GGUF qwen2 files need the same permutation on load.)
bool hf_rotary_permuted(const std::string& arch);

// Reorders `n_head * head_dim` rows of `row_bytes` bytes each from rotate-half order to adjacent pairs:
// within each head, destination row 2i is source row i and 2i+1 is source row i + head_dim/2 - the
// reshape(n_head, 2, head_dim/2, ...).swapaxes(1, 2) of llama.cpp's converter. A bias has rows of one
// element. `src` and `dst` must not overlap.
void permute_rotary_rows(const uint8_t* src, uint8_t* dst, int64_t n_head, int64_t head_dim, uint64_t row_bytes);

// A tokenizer given apart from the model (`--tokenizer`): its vocabulary and chat template.
struct TokenizerFiles {
  Vocab vocab;
  std::string chat_template;  // "" when the files carry none
  std::string path;           // what was opened, for messages
};

// Reads a tokenizer from a Hugging Face tokenizer.json (its sibling tokenizer_config.json supplies
// special tokens and the chat template when present), a directory holding tokenizer.json, or a GGUF
// file (a vocabulary-only file works). Throws Error naming the path otherwise.
TokenizerFiles load_tokenizer_files(const std::string& path);

// `model` with its vocabulary and chat template replaced by `tok` (a template only when `tok` has one;
// else the model's stays). A tokenizer with more tokens than the model's embedding has rows is refused
// with an Error naming both sizes: its ids would index past the embedding. A smaller one is accepted,
// as checkpoints pad their embeddings (Qwen2: 151936 rows for 151665 tokens).
std::unique_ptr<ModelSource> with_tokenizer(std::unique_ptr<ModelSource> model, TokenizerFiles tok);

}  // namespace shardlm
