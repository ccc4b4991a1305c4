#include "quant/kernels.h"

namespace shardlm::quant_detail {

void matmul_avx2(GgmlType type, const uint8_t* w, size_t row_stride, int64_t n_rows, int64_t n_cols,
                 const float* x, int64_t ldx, int64_t n_tok, float* y, int64_t ldy) {
  matmul_scalar(type, w, row_stride, n_rows, n_cols, x, ldx, n_tok, y, ldy);
}

}  // namespace shardlm::quant_detail
