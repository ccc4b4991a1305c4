// The packed matvecs' int8 view of an activation row, shared by the matvec prologue (matvec_packed.cu) and
// the kernels that produce activations (ops.cu), so that a row quantized where it is produced is bit for
// bit the row a matvec would quantize itself.
//
// Scheme per 32 elements: d = max|x| / 127, q_j = round-half-even(x_j * (127 / max|x|)), s = d * sum q_j.
// Layout of a row of n elements (n % 32 == 0), in 4-byte words: n / 4 words of 4 int8 (elements 4i..4i+3),
// then d (n / 32 floats), then s (n / 32 floats).
#pragma once

#include <cstdint>

namespace shardlm::cuda_detail {

constexpr int64_t quant_x_words(int64_t n) { return n / 4 + 2 * (n / 32); }

// Called by all 32 lanes of a warp together. Lane l holds float4 number e4 of the row; lanes 8g..8g+7 must
// hold one 32-element unit (consecutive e4 starting at a multiple of 8). Lanes with valid == false (a
// whole group of 8) store nothing.
__device__ __forceinline__ void quantize_store4(float4 v, int64_t e4, bool valid, int* __restrict__ xq /* (n/4) */,
                                                float* __restrict__ xd /* (n/32) */, float* __restrict__ xs /* (n/32) */) {
  float a = fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
  a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, 1));
  a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, 2));
  a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, 4));
  const float d = a / 127.0f, id = a > 0.0f ? 127.0f / a : 0.0f;
  const int q0 = __float2int_rn(v.x * id), q1 = __float2int_rn(v.y * id);
  const int q2 = __float2int_rn(v.z * id), q3 = __float2int_rn(v.w * id);
  int sum = q0 + q1 + q2 + q3;
  sum += __shfl_xor_sync(0xffffffffu, sum, 1);
  sum += __shfl_xor_sync(0xffffffffu, sum, 2);
  sum += __shfl_xor_sync(0xffffffffu, sum, 4);
  if (valid) {
    xq[e4] = (q0 & 0xFF) | ((q1 & 0xFF) << 8) | ((q2 & 0xFF) << 16) | static_cast<int>(static_cast<uint32_t>(q3) << 24);
    if ((e4 & 7) == 0) {
      xd[e4 / 8] = d;
      xs[e4 / 8] = d * static_cast<float>(sum);
    }
  }
}

// The same for one element per lane: lane l holds element e = e0 + l of the row (e0 % 32 == 0), so the
// warp holds one unit. Max and sum are exact, so the result equals quantize_store4's bit for bit.
__device__ __forceinline__ void quantize_store1(float v, int64_t e, bool valid, int* __restrict__ xq,
                                                float* __restrict__ xd, float* __restrict__ xs) {
  float a = fabsf(v);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
  const float d = a / 127.0f, id = a > 0.0f ? 127.0f / a : 0.0f;
  const int q = __float2int_rn(v * id);
  int sum = q;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  const uint32_t b = static_cast<uint32_t>(q) & 0xFFu;
  const uint32_t w = b | (__shfl_down_sync(0xffffffffu, b, 1) << 8) | (__shfl_down_sync(0xffffffffu, b, 2) << 16) |
                     (__shfl_down_sync(0xffffffffu, b, 3) << 24);
  if (valid && (e & 3) == 0) xq[e / 4] = static_cast<int>(w);
  if (valid && (e & 31) == 0) {
    xd[e / 32] = d;
    xs[e / 32] = d * static_cast<float>(sum);
  }
}

// The same two, given the whole row buffer (quant_x_words(n) words, the layout above) instead of its planes.
__device__ __forceinline__ void quantize_store4(float4 v, int64_t e4, bool valid, int* __restrict__ row, int64_t n) {
  float* xd = reinterpret_cast<float*>(row + n / 4);
  quantize_store4(v, e4, valid, row, xd, xd + n / 32);
}
__device__ __forceinline__ void quantize_store1(float v, int64_t e, bool valid, int* __restrict__ row, int64_t n) {
  float* xd = reinterpret_cast<float*>(row + n / 4);
  quantize_store1(v, e, valid, row, xd, xd + n / 32);
}

}  // namespace shardlm::cuda_detail
