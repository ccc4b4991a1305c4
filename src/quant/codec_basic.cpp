// Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q5_K, IQ4_NL, IQ4_XS, MXFP4 (see codecs.h).
#include "quant/codecs.h"

namespace shardlm::quant_detail {

bool dequantize_basic(GgmlType, const uint8_t*, float*, int64_t) { return false; }
bool quantize_basic(GgmlType, const float*, uint8_t*, int64_t) { return false; }

}  // namespace shardlm::quant_detail
