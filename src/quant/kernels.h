// Per-ISA kernel entry points behind the public dot/matvec/matmul functions. Arguments are validated by
// the caller (dispatch.cpp); these only compute.
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/dtype.h"

namespace shardlm::quant_detail {

// y[t*ldy + r] = dot(row r of w, x + t*ldx) for r < n_rows, t < n_tok.
//   w: n_rows rows of n_cols elements of `type`, row_stride bytes apart
//   x: (n_tok, ldx) fp32 activations;  y: (n_tok, ldy) fp32 outputs
using MatmulFn = void (*)(GgmlType type, const uint8_t* w, size_t row_stride, int64_t n_rows,
                          int64_t n_cols, const float* x, int64_t ldx, int64_t n_tok, float* y,
                          int64_t ldy);

void matmul_scalar(GgmlType type, const uint8_t* w, size_t row_stride, int64_t n_rows, int64_t n_cols,
                   const float* x, int64_t ldx, int64_t n_tok, float* y, int64_t ldy);
void matmul_avx2(GgmlType type, const uint8_t* w, size_t row_stride, int64_t n_rows, int64_t n_cols,
                 const float* x, int64_t ldx, int64_t n_tok, float* y, int64_t ldy);
void matmul_avx512(GgmlType type, const uint8_t* w, size_t row_stride, int64_t n_rows, int64_t n_cols,
                   const float* x, int64_t ldx, int64_t n_tok, float* y, int64_t ldy);


// The integer kernels of the avx2 family for the types in quantizes_activations (quant.h).
void matmul_int8_avx2(GgmlType type, const uint8_t* w, size_t row_stride, int64_t n_rows, int64_t n_cols,
                      const float* x, int64_t ldx, int64_t n_tok, float* y, int64_t ldy);

// n F16 or BF16 values at src -> dst (n) floats, 8 at a time (exact conversions: the reference's values).
void convert_halves_avx2(GgmlType type, const uint8_t* src, float* dst, int64_t n);

// One token's activations rounded for the integer kernels (kernels_avx2.cpp's round_activations).
struct ActRow {
  const int8_t* q;      // (n_cols) int8 values
  const float* d;       // (n_cols / 32) block scales
  const float* s;       // (n_cols / 32) d * (sum of the block's q): the block-minimum term of Q4_K
  const int32_t* sum;   // (n_cols / 32) sum of the block's q: the offset term of packed Q4_0 and Q8_0
  const int32_t* sums;  // (n_cols / 32) the sums of q[0..15] and q[16..31] as two int16 (low, high): packed Q6_K's
};

// Kernels of a wider family for packed integer groups, two at a time: the first n_groups / 2 * 2 groups (gb bytes
// each, from w) times n_tok rounded tokens a into y (n_tok rows ldy apart, 8 floats a group); returns the groups
// done. Their results must have the same bits as the avx2 group tiles'.
using PairTilesFn = int64_t (*)(GgmlType type, const uint8_t* w, size_t gb, int64_t n_groups, int64_t n_cols,
                                const ActRow* a, int64_t n_tok, float* y, int64_t ldy);

// Rows packed by pack_rows (quant.h; Q8_0, Q4_0, Q4_K, Q6_K, F16 or BF16): the first n_rows / 8 * 8 rows in groups
// of 8 (blocks.h's kQ8x8 / kQ4x8 / kQ4Kx8 / kQ6Kx8 / kFx8 layouts), row_stride bytes a row; the rest in ggml's
// layout, which only the integer types take here (F16 / BF16: whole groups; dispatch.cpp runs their tail rows).
// `pairs`, where given, takes the integer types' groups it can.
void matmul_packed_avx2(GgmlType type, const uint8_t* w, size_t row_stride, int64_t n_rows, int64_t n_cols,
                        const float* x, int64_t ldx, int64_t n_tok, float* y, int64_t ldy, PairTilesFn pairs = nullptr);
// AVX-512 VNNI (vpdpbusd on 16 lanes: two groups, one row a lane) for Q8_0, Q4_0, Q4_K and Q6_K groups: a
// PairTilesFn. Only called where the CPU has AVX-512 F, BW, VL and VNNI.
int64_t packed_pairs_vnni(GgmlType type, const uint8_t* w, size_t gb, int64_t n_groups, int64_t n_cols,
                          const ActRow* a, int64_t n_tok, float* y, int64_t ldy);
// The avx512 family's F16 / BF16 packed kernels for prefill (n_tok > 1, whole groups; the same bits as avx2's); its
// integer types take matmul_packed_avx2, with packed_pairs_vnni where the CPU has VNNI.
void matmul_packed_avx512(GgmlType type, const uint8_t* w, size_t row_stride, int64_t n_rows, int64_t n_cols,
                          const float* x, int64_t ldx, int64_t n_tok, float* y, int64_t ldy);

// attend_chunk (quant.h) in each family (kernels_attend.h).
void attend_chunk_avx2(float* s, int64_t lds, const int32_t* n_valid, int64_t n_q, const float* v, int64_t ldv,
                       int64_t hd, float scale, float* m, float* l, float* acc);
void attend_chunk_avx512(float* s, int64_t lds, const int32_t* n_valid, int64_t n_q, const float* v, int64_t ldv,
                         int64_t hd, float scale, float* m, float* l, float* acc);

}  // namespace shardlm::quant_detail
