// IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M (see codecs.h).
#include "quant/codecs.h"

namespace shardlm::quant_detail {

bool dequantize_iq(GgmlType, const uint8_t*, float*, int64_t) { return false; }
bool quantize_iq(GgmlType, const float*, uint8_t*, int64_t) { return false; }

}  // namespace shardlm::quant_detail
