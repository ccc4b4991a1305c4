// The CUDA backend's own layout for quantized matmul weights ("packed"), built on the host at load time.
//
// Why: ggml rows interleave each block's scale with its quants (18- and 34-byte blocks), so rows are only
// 2-byte aligned and a warp cannot read its blocks with aligned 16-byte loads; the decode matvec then needs
// a shared-memory staging pass. Packed rows split every row into planes, so each lane of a warp reads one
// 32-column unit's quants with one (or two) aligned 16-byte loads and its scale from a separate plane.
// Plane sizes add up to ggml's row size; the row stride is that size rounded up to 16 bytes.
//
// Per row, nb = n_cols / 32 units, nsb = n_cols / 256 super-blocks (K-quants), planes in this order:
//   Q8_0: q  (nb, 32 B: int8 elements 0..31)          | d (nb, fp16)
//   Q4_0: q  (nb, 16 B: ggml's qs: byte j low nibble = element j, high nibble = element j+16) | d (nb, fp16)
//   Q4_K: q  (nb, 16 B: one 32-element sub-block in Q4_0's nibble order) | hdr (nsb, 16 B: ggml's d, dmin,
//         scales[12] verbatim; unit u uses hdr[u / 8] and sub-block u % 8)
//   Q6_K: lo (nb, 16 B: low 4 bits, Q4_0's nibble order) | hi (nb, 8 B: two words; word h, byte k holds
//         the top 2 bits of element 4 * (4h + s) + k at bits 2s..2s+1, s = 0..3) | sc (nb, 2 x int8: the
//         scales of elements 0..15 and 16..31) | d (nsb, fp16)
// Values are unchanged: element c of a packed row equals element c of the ggml row, bit for bit.
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/dtype.h"

namespace shardlm::cuda_detail {

// Whether matmul weights of this type and width are packed (else they stay in ggml's layout).
bool packable(GgmlType type, int64_t n_cols);
// Bytes between packed rows (16-byte multiple).
size_t packed_row_stride(GgmlType type, int64_t n_cols);
// dst row r = packed src row r, r < n_rows; dst holds n_rows * packed_row_stride bytes (padding zeroed).
void pack_rows(GgmlType type, const uint8_t* src /* (n_rows, src_stride bytes) ggml */, size_t src_stride,
               int64_t n_rows, int64_t n_cols, uint8_t* dst /* (n_rows, packed_row_stride bytes) */);
// Element c of one packed row, decoded on the host (tests check the packing against ggml's decoder).
float packed_element(GgmlType type, const uint8_t* row /* packed_row_stride bytes */, int64_t n_cols, int64_t c);

}  // namespace shardlm::cuda_detail
