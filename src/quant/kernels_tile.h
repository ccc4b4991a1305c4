// Register-tiled matmul driver shared by the SIMD kernel files. Each file includes this after its
// `#pragma GCC target`, and everything here has internal linkage, so each ISA gets its own copy compiled
// for its instruction set (no inline function can be merged across ISAs by the linker).
//
// `K` supplies the vector type V (L float lanes), load/store/fma/hsum, and decode<T>(row, chunk, out) which
// dequantizes the C = K::chunk<T>() elements of chunk `chunk` of a weight row into kNv = C / L vectors
// in registers (32 for most types; a family may pick 64 where that halves per-chunk scale decoding).
// A tile is R weight rows x TB tokens: each chunk of the R rows is decoded once and multiplied with TB
// tokens. With more tokens than one tile holds, the R rows of a block type are decoded once into an fp32
// scratch buffer and the F32 tiles run every token tile over it, so prefill decodes each row once.
// Every (row, token) dot is one FMA chain over the chunks in order, whatever TB: a token's result is the
// same bits whether it is alone in a step or one of many (batch invariance: a request gives the same
// tokens whatever else the engine is running, and a sequence recomputed after preemption continues
// exactly as before). A second accumulator for one-token tiles would shorten the chain but change the
// rounding between decode and prefill.
#pragma once

namespace shardlm::quant_detail {

// A thread-local scratch buffer of at least n floats, valid until the thread's next call (dispatch.cpp:
// defined there so that no standard-library code is instantiated under a kernel file's ISA pragma).
float* decode_scratch(size_t n);

namespace {

template <class K, GgmlType T, int R, int TB>
void tile(const uint8_t* w /* (R rows, stride) */, size_t stride, int64_t n_chunks,
          const float* x /* (TB, ldx) */, int64_t ldx, float* y /* (TB, ldy) */, int64_t ldy) {
  using V = typename K::V;
  constexpr int kC = K::template chunk<T>();
  constexpr int kNv = kC / K::L;
  V acc[R][TB];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TB; ++t) acc[r][t] = K::zero();
  for (int64_t c = 0; c < n_chunks; ++c) {
    V wv[R][kNv];  // (R, 32) decoded weights of this chunk
    for (int r = 0; r < R; ++r) K::template decode<T>(w + r * stride, c, wv[r]);
    for (int t = 0; t < TB; ++t) {
      const float* xt = x + t * ldx + c * kC;
      for (int k = 0; k < kNv; ++k) {
        const V xv = K::load(xt + k * K::L);
        for (int r = 0; r < R; ++r) acc[r][t] = K::fma(wv[r][k], xv, acc[r][t]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < TB; ++t) y[t * ldy + r] = K::hsum(acc[r][t]);
}

// Rows of one group against all tokens: full token tiles of kTb, then one tail tile.
template <class K, GgmlType T, int R>
void rows_all_tokens(const uint8_t* w, size_t stride, int64_t n_chunks, const float* x, int64_t ldx,
                     int64_t n_tok, float* y, int64_t ldy) {
  constexpr int kTb = K::kTokTile;
  int64_t t = 0;
  if (n_tok == 1) {
    tile<K, T, R, 1>(w, stride, n_chunks, x, ldx, y, ldy);
    return;
  }
  if constexpr (T != GgmlType::F32 && T != GgmlType::F16 && T != GgmlType::BF16) {
    if (n_tok > kTb) {
      // More than one token tile of a block type: rather than decoding every chunk again for each tile,
      // decode the R rows once into fp32 and run the F32 tiles over them. The F32 tiles walk the same
      // vectors in the same order with the same decoded values, so every dot has the same bits as the
      // direct path (batch invariance holds across the switch). F16/BF16 convert in one or two
      // instructions, no dearer than reloading the buffer, so they stay direct.
      constexpr int kC = K::template chunk<T>();
      constexpr int kNv = kC / K::L;
      const int64_t n_cols = n_chunks * kC;
      float* buf = decode_scratch(static_cast<size_t>(R * n_cols));  // (R, n_cols) decoded rows
      for (int r = 0; r < R; ++r) {
        float* dst = buf + r * n_cols;
        for (int64_t c = 0; c < n_chunks; ++c) {
          typename K::V v[kNv];
          K::template decode<T>(w + r * stride, c, v);
          for (int k = 0; k < kNv; ++k) K::store(dst + c * kC + k * K::L, v[k]);
        }
      }
      rows_all_tokens<K, GgmlType::F32, R>(reinterpret_cast<const uint8_t*>(buf), n_cols * sizeof(float),
                                           n_cols / K::template chunk<GgmlType::F32>(), x, ldx, n_tok, y, ldy);
      return;
    }
  }
  for (; t + kTb <= n_tok; t += kTb) tile<K, T, R, kTb>(w, stride, n_chunks, x + t * ldx, ldx, y + t * ldy, ldy);
  const float* xt = x + t * ldx;
  float* yt = y + t * ldy;
  switch (n_tok - t) {
    case 0: break;
    case 1: tile<K, T, R, 1>(w, stride, n_chunks, xt, ldx, yt, ldy); break;
    case 2: tile<K, T, R, 2>(w, stride, n_chunks, xt, ldx, yt, ldy); break;
    case 3: if constexpr (kTb > 3) tile<K, T, R, 3>(w, stride, n_chunks, xt, ldx, yt, ldy); break;
    default: break;
  }
}

template <class K, GgmlType T>
void matmul_type(const uint8_t* w, size_t stride, int64_t n_rows, int64_t n_cols, const float* x,
                 int64_t ldx, int64_t n_tok, float* y, int64_t ldy) {
  constexpr int kR = K::template row_tile<T>();
  const int64_t n_chunks = n_cols / K::template chunk<T>();
  int64_t r = 0;
  for (; r + kR <= n_rows; r += kR)
    rows_all_tokens<K, T, kR>(w + r * stride, stride, n_chunks, x, ldx, n_tok, y + r, ldy);
  for (; r < n_rows; ++r) rows_all_tokens<K, T, 1>(w + r * stride, stride, n_chunks, x, ldx, n_tok, y + r, ldy);
}

template <class K>
void matmul_dispatch(GgmlType type, const uint8_t* w, size_t stride, int64_t n_rows, int64_t n_cols,
                     const float* x, int64_t ldx, int64_t n_tok, float* y, int64_t ldy) {
  switch (type) {
    case GgmlType::F32: return matmul_type<K, GgmlType::F32>(w, stride, n_rows, n_cols, x, ldx, n_tok, y, ldy);
    case GgmlType::F16: return matmul_type<K, GgmlType::F16>(w, stride, n_rows, n_cols, x, ldx, n_tok, y, ldy);
    case GgmlType::BF16: return matmul_type<K, GgmlType::BF16>(w, stride, n_rows, n_cols, x, ldx, n_tok, y, ldy);
    case GgmlType::Q8_0: return matmul_type<K, GgmlType::Q8_0>(w, stride, n_rows, n_cols, x, ldx, n_tok, y, ldy);
    case GgmlType::Q4_0: return matmul_type<K, GgmlType::Q4_0>(w, stride, n_rows, n_cols, x, ldx, n_tok, y, ldy);
    case GgmlType::Q4_K: return matmul_type<K, GgmlType::Q4_K>(w, stride, n_rows, n_cols, x, ldx, n_tok, y, ldy);
    case GgmlType::Q6_K: return matmul_type<K, GgmlType::Q6_K>(w, stride, n_rows, n_cols, x, ldx, n_tok, y, ldy);
    case GgmlType::Q4_1: return matmul_type<K, GgmlType::Q4_1>(w, stride, n_rows, n_cols, x, ldx, n_tok, y, ldy);
    case GgmlType::Q5_0: return matmul_type<K, GgmlType::Q5_0>(w, stride, n_rows, n_cols, x, ldx, n_tok, y, ldy);
    case GgmlType::Q5_1: return matmul_type<K, GgmlType::Q5_1>(w, stride, n_rows, n_cols, x, ldx, n_tok, y, ldy);
    case GgmlType::Q2_K: return matmul_type<K, GgmlType::Q2_K>(w, stride, n_rows, n_cols, x, ldx, n_tok, y, ldy);
    case GgmlType::Q3_K: return matmul_type<K, GgmlType::Q3_K>(w, stride, n_rows, n_cols, x, ldx, n_tok, y, ldy);
    case GgmlType::Q5_K: return matmul_type<K, GgmlType::Q5_K>(w, stride, n_rows, n_cols, x, ldx, n_tok, y, ldy);
    case GgmlType::IQ4_NL: return matmul_type<K, GgmlType::IQ4_NL>(w, stride, n_rows, n_cols, x, ldx, n_tok, y, ldy);
    case GgmlType::IQ4_XS: return matmul_type<K, GgmlType::IQ4_XS>(w, stride, n_rows, n_cols, x, ldx, n_tok, y, ldy);
    case GgmlType::MXFP4: return matmul_type<K, GgmlType::MXFP4>(w, stride, n_rows, n_cols, x, ldx, n_tok, y, ldy);
    case GgmlType::IQ2_XXS: return matmul_type<K, GgmlType::IQ2_XXS>(w, stride, n_rows, n_cols, x, ldx, n_tok, y, ldy);
    case GgmlType::IQ2_XS: return matmul_type<K, GgmlType::IQ2_XS>(w, stride, n_rows, n_cols, x, ldx, n_tok, y, ldy);
    case GgmlType::IQ2_S: return matmul_type<K, GgmlType::IQ2_S>(w, stride, n_rows, n_cols, x, ldx, n_tok, y, ldy);
    case GgmlType::IQ3_XXS: return matmul_type<K, GgmlType::IQ3_XXS>(w, stride, n_rows, n_cols, x, ldx, n_tok, y, ldy);
    case GgmlType::IQ3_S: return matmul_type<K, GgmlType::IQ3_S>(w, stride, n_rows, n_cols, x, ldx, n_tok, y, ldy);
    case GgmlType::IQ1_S: return matmul_type<K, GgmlType::IQ1_S>(w, stride, n_rows, n_cols, x, ldx, n_tok, y, ldy);
    case GgmlType::IQ1_M: return matmul_type<K, GgmlType::IQ1_M>(w, stride, n_rows, n_cols, x, ldx, n_tok, y, ldy);
    default: break;
  }
  SHARDLM_CHECK(false, "no SIMD kernel for ", type_name(type));
}

}  // namespace
}  // namespace shardlm::quant_detail
