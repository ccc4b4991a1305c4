// Portable fallback: decode each weight row once into fp32, then dot it with every token in double.
// Not fast, but the row is read once for all tokens and it runs on any CPU.
#include <vector>

#include "quant/kernels.h"
#include "quant/quant.h"

namespace shardlm::quant_detail {

void matmul_scalar(GgmlType type, const uint8_t* w, size_t row_stride, int64_t n_rows, int64_t n_cols,
                   const float* x, int64_t ldx, int64_t n_tok, float* y, int64_t ldy) {
  std::vector<float> row(static_cast<size_t>(n_cols));  // (n_cols) one decoded weight row
  for (int64_t r = 0; r < n_rows; ++r) {
    dequantize_row(type, w + static_cast<size_t>(r) * row_stride, row.data(), n_cols);
    for (int64_t t = 0; t < n_tok; ++t) {
      const float* xt = x + t * ldx;
      double acc = 0.0;
      for (int64_t i = 0; i < n_cols; ++i) acc += static_cast<double>(row[i]) * xt[i];
      y[t * ldy + r] = static_cast<float>(acc);
    }
  }
}

}  // namespace shardlm::quant_detail
