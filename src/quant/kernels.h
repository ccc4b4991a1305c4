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

// Rows packed by pack_rows (quant.h; Q8_0, Q4_0, Q4_K or Q6_K): the first n_rows / 8 * 8 rows in groups of 8
// (blocks.h's kQ8x8 / kQ4x8 / kQ4Kx8 / kQ6Kx8 layouts), row_stride bytes a row; the rest in ggml's layout.
void matmul_packed_avx2(GgmlType type, const uint8_t* w, size_t row_stride, int64_t n_rows, int64_t n_cols,
                        const float* x, int64_t ldx, int64_t n_tok, float* y, int64_t ldy);
// The same in the avx512 family: its own F16 / BF16 kernels (the same bits as avx2's), avx2's for the others.
void matmul_packed_avx512(GgmlType type, const uint8_t* w, size_t row_stride, int64_t n_rows, int64_t n_cols,
                          const float* x, int64_t ldx, int64_t n_tok, float* y, int64_t ldy);

}  // namespace shardlm::quant_detail
