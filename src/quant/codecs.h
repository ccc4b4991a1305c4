// Row codecs of the weight types beyond the first seven (quant_ref.cpp holds F32/F16/BF16/Q8_0/Q4_0/Q4_K/
// Q6_K). quantize_row/dequantize_row validate their arguments and then call these, so here `n` is always a
// whole number of blocks and the pointers are valid. Each returns false for a type it does not handle, so
// the caller can try the next file's codecs.
//
// codec_basic.cpp: Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q5_K, IQ4_NL, IQ4_XS, MXFP4 (no lookup grids).
// codec_iq.cpp:    IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M (the grids of quant/iq_tables.h).
#pragma once

#include <cstdint>

#include "core/dtype.h"

namespace shardlm::quant_detail {

// x: row_bytes(type, n) bytes of blocks;  y: (n) floats.
bool dequantize_basic(GgmlType type, const uint8_t* x, float* y, int64_t n);
bool dequantize_iq(GgmlType type, const uint8_t* x, float* y, int64_t n);

// x: (n) floats;  y: row_bytes(type, n) bytes. ggml's reference quantizers (quantize_row_*_ref), so the
// bytes are what llama-quantize writes without an importance matrix.
bool quantize_basic(GgmlType type, const float* x, uint8_t* y, int64_t n);
// The IQ types that ggml can write without an importance matrix; false for the others (IQ2_XXS, IQ2_XS,
// IQ1_S, IQ1_M: llama-quantize refuses them without one, and so do we).
bool quantize_iq(GgmlType type, const float* x, uint8_t* y, int64_t n);

// With an importance matrix: ggml's quantize_<type>(src, dst, 1, n, quant_weights) as llama-quantize calls it
// with `--imatrix` (the *_impl algorithms that weigh each element's error), so the bytes equal its output.
// imatrix: (n) one importance per column of the row (llama-imatrix's sum of squared activations / count), the same
// for every row of the tensor; never null here. Return false for a type the file does not handle.
// codec_basic.cpp: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL, IQ4_XS, MXFP4.
// codec_iq.cpp:    IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M.
// ggml's make_qkx2_quants (codec_basic.cpp): the (scale, min) fit of the Q4_K, Q5_K and Q2_K reference quantizers.
//   x, weights: (n);  L, laux: (n) levels in [0, nmax] (laux is scratch);  the_min receives -min.
float make_qkx2_quants(int n, int nmax, const float* x, const float* weights, uint8_t* L, float& the_min,
                       uint8_t* laux, float rmin, float rdelta, int nstep, bool use_mad);

bool quantize_basic_imatrix(GgmlType type, const float* x, uint8_t* y, int64_t n, const float* imatrix);
bool quantize_iq_imatrix(GgmlType type, const float* x, uint8_t* y, int64_t n, const float* imatrix);

}  // namespace shardlm::quant_detail
