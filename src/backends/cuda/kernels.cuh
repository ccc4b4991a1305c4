// Kernel launchers of the CUDA backend. Private to src/backends/cuda.
//
// Every launcher enqueues on `stream`, never synchronizes and checks the launch. Pointers are device
// memory unless named host_*. Shapes follow backend.h: activations f32 row-major (n_tok, width).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "comm/device_push.h"
#include "core/dtype.h"

namespace shardlm::cuda_detail {

// One sequence's share of the current step in device memory (begin_step writes one per sequence of the
// batch; rope, kv_store and attention read their sequence's, so that a captured graph sees the new
// positions on every replay).
struct StepDev {
  int64_t pos0;   // position of the sequence's first token in this step
  int64_t n_tok;  // its tokens in this step
  int64_t tok0;   // its first token's row in the step (batched kernels offset q, k, v and out by it)
  int64_t block;  // its cache block (batched kernels offset the pool by it)
};

// The KV launchers below work on one sequence: `step` is its StepDev, q/k/v/out its rows of the step, and
// k_cache / v_cache its cache range of n_ctx positions (n_ctx, n_head_kv, head_dim), which is the
// sequence's one pool block (KvLayerView::block_size positions; the backend offsets the pool to it).

// ---- weight types ----
// The block types without kernels of their own (every one but Q8_0, Q4_0, Q4_K and Q6_K): "grouped", since
// in each of them the 8 elements 8g .. 8g+7 share every scale, sign byte and grid entry, which
// dequant.cuh's dq_group8 decodes together. They take the generic paths: get_rows8, the group matvec
// (decode and small batches), the group dequantization to 16 bits before cuBLAS (prefill); never packed.
__host__ __device__ constexpr bool dq_grouped(GgmlType t) {
  switch (t) {
    case GgmlType::Q4_1:
    case GgmlType::Q5_0:
    case GgmlType::Q5_1:
    case GgmlType::Q2_K:
    case GgmlType::Q3_K:
    case GgmlType::Q5_K:
    case GgmlType::IQ2_XXS:
    case GgmlType::IQ2_XS:
    case GgmlType::IQ2_S:
    case GgmlType::IQ3_XXS:
    case GgmlType::IQ3_S:
    case GgmlType::IQ1_S:
    case GgmlType::IQ1_M:
    case GgmlType::IQ4_NL:
    case GgmlType::IQ4_XS:
    case GgmlType::MXFP4:
      return true;
    default:
      return false;
  }
}

// ---- matrix-vector (decode) ----
// Whether the fast kernels handle this layout (else matvec falls back to a simple, slower kernel).
bool matvec_fast_path(GgmlType type, const void* w, size_t row_stride, int64_t n_cols);
// y[r] = sum_c W[r, c] * x[c]; W has n_rows rows of n_cols elements of `type`, row_stride bytes apart.
void launch_matvec(GgmlType type, const void* w /* (n_rows, row_stride bytes) */, size_t row_stride,
                   int64_t n_rows, int64_t n_cols, const float* x /* (n_cols) */, float* y /* (n_rows) */,
                   cudaStream_t stream, bool force_generic = false);

// Several weights of one type and width times the same x in one launch: y[k] = W[k] x for k < n (n <= 4).
// Returns false (nothing launched) when the group is not covered (a layout off the fast path, Q6_K, a
// quantized layout the rows kernel does not take); the caller then launches them one by one.
bool launch_matvec_group(GgmlType type, int n, const void* const* w, const size_t* row_stride, const int64_t* n_rows,
                         int64_t n_cols, const float* x /* (n_cols), 16-byte aligned */, float* const* y,
                         cudaStream_t stream);

// Packed weights (pack.h; x quantized to int8 per 32 elements inside the kernel): y[k] = W[k] x for k < n
// (n <= 4, same type and width). Rows and row strides 16-byte aligned. xpre: x already quantized
// (quant_x.cuh layout, 16-byte aligned) by the kernel that produced it, or null.
void launch_matvec_packed(GgmlType type, int n, const void* const* w, const size_t* row_stride, const int64_t* n_rows,
                          int64_t n_cols, const float* x /* (n_cols) */, float* const* y /* (n_rows[k]) each */,
                          int sm_count, cudaStream_t stream, int variant = 0,
                          const int* xpre /* (quant_x_words(n_cols)) or null */ = nullptr,
                          const DevicePush* push /* one weight (n == 1): its outputs also pushed, or null */ = nullptr);

// Several tokens (n_tok >= 2) times packed weights: y[k] (n_tok, n_rows[k]) = x W[k]^T, each weight read once
// per pass of matvec_tokens_per_pass(n_cols) tokens; every output has the bits launch_matvec_packed gives
// for its token alone. xq: x's rows quantized by launch_quantize_rows (16-byte aligned).
int matvec_tokens_per_pass(int64_t n_cols);  // 8, 4 or 2 (what fits shared memory), 0: not available
size_t quant_rows_bytes(int64_t n_tok, int64_t n_cols);
void launch_quantize_rows(const float* x /* (n_tok, n_cols) */, int64_t n_tok, int64_t n_cols,
                          int* out /* quant_rows_bytes(n_tok, n_cols) */, cudaStream_t stream);
void launch_matvec_tokens(GgmlType type, int n, const void* const* w, const size_t* row_stride, const int64_t* n_rows,
                          int64_t n_cols, const int* xq, int64_t n_tok, float* const* y /* (n_tok, n_rows[k]) each */,
                          int sm_count, cudaStream_t stream);

// Steps of many tokens times packed weights on the tensor cores: y (n_tok, n_rows) = x W^T, W dequantized to
// fp16 in shared memory (the cuBLAS path's values), x16 the step's x in fp16 (launch_f32_to_16, 16-byte aligned),
// fp32 accumulation. `scratch` holds matmul_mma_scratch_floats(...) floats (the column slices' partial sums;
// 0: none needed).
size_t matmul_mma_scratch_floats(int64_t n_rows, int64_t n_cols, int64_t n_tok, int sm_count);
void launch_matmul_mma(GgmlType type, const void* w, size_t row_stride, int64_t n_rows, int64_t n_cols,
                       const void* x16 /* (n_tok, n_cols) fp16 */, int64_t n_tok, float* y /* (n_tok, n_rows) */,
                       float* scratch, int sm_count, cudaStream_t stream);

// ---- conversions for the cuBLAS (prefill) path ----
// dst[r, c] = W[row0 + r, c] as fp16 (or bf16 when to_bf16), for r in [0, n_rows).
void launch_dequant_rows(GgmlType type, const void* w, size_t row_stride, int64_t row0, int64_t n_rows,
                         int64_t n_cols, void* dst /* (n_rows, n_cols) 16-bit */, bool to_bf16,
                         cudaStream_t stream);
// The same for packed rows (pack.h).
void launch_dequant_packed(GgmlType type, const void* w, size_t row_stride, int64_t row0, int64_t n_rows,
                           int64_t n_cols, void* dst /* (n_rows, n_cols) 16-bit, 16-byte aligned */, bool to_bf16,
                           cudaStream_t stream);
// dst[i] = (half or bf16) src[i].
void launch_f32_to_16(const float* src /* (n) */, void* dst /* (n) */, int64_t n, bool to_bf16,
                      cudaStream_t stream);

// ---- embedding lookup ----
// out[t, :] = row ids[t] of the table, dequantized to f32.
void launch_get_rows(GgmlType type, const void* table, size_t row_stride, int64_t n_rows_table,
                     int64_t n_cols, const int32_t* ids /* (n_tok), device */, int64_t n_tok,
                     float* out /* (n_tok, n_cols) */, cudaStream_t stream);

// ---- element-wise and normalization ----
// xq (optional): the output also quantized for the packed matvecs (quant_x.cuh layout) where the kernel can
// (one row, n % 32 == 0, 16-byte aligned); returns whether it was written.
bool launch_rms_norm(const float* x /* (n_tok, n) */, const float* w /* (n) */, float* y /* (n_tok, n) */,
                     int64_t n_tok, int64_t n, float eps, cudaStream_t stream, int* xq = nullptr);
// x += delta, then y = rms_norm(x) * w (same operations as launch_add + launch_rms_norm, one kernel).
bool launch_add_rms_norm(float* x /* (n_tok, n) */, const float* delta /* (n_tok, n) */, const float* w /* (n) */,
                         float* y /* (n_tok, n) */, int64_t n_tok, int64_t n, float eps, cudaStream_t stream,
                         int* xq = nullptr);
void launch_add_bias(float* y /* (n_tok, n) */, const float* b /* (n) */, int64_t n_tok, int64_t n,
                     cudaStream_t stream);
void launch_add(float* y /* (n) */, const float* x /* (n) */, int64_t n, cudaStream_t stream);
bool launch_swiglu(const float* gate /* (n) */, const float* up /* (n) */, float* out /* (n) */, int64_t n,
                   cudaStream_t stream, int* xq = nullptr);
void launch_rope(float* x /* (n_tok, n_heads, head_dim) */, int64_t n_tok, int64_t n_heads, int64_t head_dim,
                 float freq_base, const float* freq_factors /* (head_dim/2) device, or null */,
                 const StepDev* step, cudaStream_t stream);

// ---- KV cache and attention ----
void launch_kv_store(GgmlType kv_type, void* k_cache /* (n_ctx, n_head_kv, head_dim) */,
                     void* v_cache /* (n_ctx, n_head_kv, head_dim) */, int64_t n_ctx, int64_t n_head_kv,
                     int64_t head_dim, const float* k /* (n_tok, n_head_kv, head_dim) */,
                     const float* v /* (n_tok, n_head_kv, head_dim) */, int64_t n_tok, const StepDev* step,
                     cudaStream_t stream);

// launch_rope on q and on k, then launch_kv_store, as one kernel with the same arithmetic.
void launch_rope_kv_store(GgmlType kv_type, float* q /* (n_tok, n_head, head_dim) */,
                          float* k /* (n_tok, n_head_kv, head_dim) */, const float* v /* (n_tok, n_head_kv, head_dim) */,
                          void* k_cache /* (n_ctx, n_head_kv, head_dim) */, void* v_cache /* same */, int64_t n_ctx,
                          int64_t n_tok, int64_t n_head, int64_t n_head_kv, int64_t head_dim, float freq_base,
                          const float* freq_factors /* (head_dim/2) device, or null */, const StepDev* step,
                          cudaStream_t stream);

// Splits used by the decode kernel for a cache of n_ctx positions (fixed per cache size, so graphs keep
// their launch shapes while the context grows).
int attention_decode_splits(int64_t n_ctx, int64_t n_head_kv, int sm_count);
// Whether the flash-decoding kernel has an instantiation for this head_dim / group size.
bool attention_decode_supported(int64_t head_dim, int64_t group);
// Decode (n_tok == 1): flash-decoding over `n_split` slices of [0, pos0], then a combine kernel; with `done`
// (counters left at zero between calls) the last block of each KV head to finish combines instead, and
// there is no combine kernel.
// xq (optional): the output also quantized for the packed matvecs (quant_x.cuh); returns whether it was.
// k_new (optional, with v_new): the fused rope_attention form. q and k_new are not yet rotated; the kernel
// rotates them (rope_pair's angles) and stores the rotated key and v_new at position pos0 of the caches
// (q and k_new are left as they were).
// Batched: one launch serves the step's sequences step[0 .. n_seq) whose n_tok is 1 (others are skipped: a
// prompt chunk in the same step has its own kernels). Sequence s reads row step[s].tok0 of q (and k_new,
// v_new) and writes that row of out; its cache is block step[s].block of the pool (n_ctx positions each).
// `partial` holds n_seq * n_head * n_split * (head_dim + 2) floats, `done` n_seq * n_head_kv * qsplit
// counters; xq only for a one-row step (n_seq 1).
bool launch_attention_decode(GgmlType kv_type, const float* q /* (n_tok, n_head, head_dim) */,
                             void* k_cache /* (n_blocks, n_ctx, n_head_kv, head_dim) */, void* v_cache, int64_t n_ctx,
                             int64_t n_head_kv, int64_t head_dim, int64_t n_head, int n_split, float* partial,
                             float* out /* (n_tok, n_head, head_dim) */, const StepDev* step /* (n_seq) */,
                             int64_t n_seq, cudaStream_t stream, int* xq = nullptr,
                             const float* k_new = nullptr /* (n_tok, n_head_kv, head_dim) */,
                             const float* v_new = nullptr /* (n_tok, n_head_kv, head_dim) */, float freq_base = 0.0f,
                             const float* freq_factors = nullptr /* (head_dim/2) device, or null */,
                             bool out4 = true /* false: the one-element output step (A/B only) */,
                             int qsplit = 1 /* blocks per KV head: 1, or 2 / 4 for groups of at least that */,
                             int* done = nullptr /* (n_head_kv * qsplit) zeros, or null: see below */);
// Any n_tok (prefill): one block per (token, head), online softmax over 32-position key tiles, causal.
void launch_attention_generic(GgmlType kv_type, const float* q /* (n_tok, n_head, head_dim) */,
                              const void* k_cache, const void* v_cache, int64_t n_ctx, int64_t n_head_kv,
                              int64_t head_dim, int64_t n_tok, int64_t n_head,
                              float* out /* (n_tok, n_head, head_dim) */, const StepDev* step,
                              cudaStream_t stream);

// Prefill (any n_tok, head_dim 64 or 128, 16-byte aligned out and caches): tiles of 32/64 query tokens x one
// head per block, K/V tiles of 64 positions in shared memory, FP32 register-tiled products, online softmax.
// Returns false (nothing launched) when the shape or alignment is not covered.
bool launch_attention_prefill(GgmlType kv_type, const float* q /* (n_tok, n_head, head_dim) */, const void* k_cache,
                              const void* v_cache, int64_t n_ctx, int64_t n_head_kv, int64_t head_dim, int64_t n_tok,
                              int64_t n_head, float* out /* (n_tok, n_head, head_dim) */, const StepDev* step,
                              int sm_count, cudaStream_t stream);

// ---- sampling ----
// `scratch` is one device u64 owned by the caller (zeroed here, on the stream).
void launch_argmax(const float* x /* (n) */, int64_t n, int32_t* out /* (1) */, unsigned long long* scratch,
                   cudaStream_t stream);
// The largest candidate key (ops/candidates.h order) of x into *key (device u64; zeroed here).
void launch_argmax_key(const float* x /* (n) */, int64_t n, unsigned long long* key, cudaStream_t stream);
// The same for each of n_rows rows (1 to 65,535) of x: keys[r] = row r's key.
void launch_argmax_keys(const float* x /* (n_rows, n) */, int64_t n, int64_t n_rows, unsigned long long* keys /* (n_rows) */,
                        cudaStream_t stream);
// Greedy decoding with the token in device memory: this member's best candidate of x (ids + id_offset) into
// slot `slot` of cands (n_slots, 4), the other slots zeroed (Backend::greedy_candidate's encoding); `key` is
// one device u64 of scratch.
void launch_greedy_candidate(const float* x /* (n) */, int64_t n, int64_t id_offset, unsigned long long* key,
                             float* cands /* (n_slots, 4) */, int slot, int n_slots, cudaStream_t stream);
// The best of the slots: *token (device) and host_ring[step->pos0 % 2] (mapped host memory; -1: none).
void launch_greedy_pick(const float* cands /* (n_slots, 4) */, int n_slots, int32_t* token /* (1) */,
                        int32_t* host_ring /* (2) */, const StepDev* step, cudaStream_t stream);
// Top-k keys of x, best first: returns the device pointer (a or b) that holds them (k). a and b hold
// topk_scratch_keys(n, k) keys each. k <= kTopMaxK.
constexpr int kTopMaxK = 256;
int64_t topk_scratch_keys(int64_t n, int k);
const unsigned long long* launch_topk(const float* x /* (n) */, int64_t n, int k, unsigned long long* a,
                                      unsigned long long* b, cudaStream_t stream);
// out[i] = x[idx[i]] (device arrays).
void launch_gather_f32(const float* x, const int32_t* idx /* (n) */, int n, float* out /* (n) */, cudaStream_t stream);

// Test/bench helper: fills `bytes` of `dst` with valid random data for `type` (finite scales for block
// types, values in [-1, 1] for float types), seeded.
void launch_fill_random(GgmlType type, void* dst, int64_t n_rows, size_t row_stride, int64_t n_cols,
                        uint64_t seed, cudaStream_t stream);

}  // namespace shardlm::cuda_detail
