// One chunk of attention's online softmax (flash attention's update), shared by the SIMD kernel files: each
// includes this after its `#pragma GCC target` (internal linkage, so each ISA gets its own copy; nothing from the
// standard library is instantiated here, for the same reason as kernels_tile.h).
//
// `K` supplies the vector type V (L float lanes) and zero/set1/load/store/add/sub/mul/max/fma/hsum/hmax/lane0,
// and exp (for x <= 0; 0 below fp32's normal range).
//
// Each query row is computed from its own scores and the chunk's V rows only, in an order fixed by its number of
// valid positions: a query's result does not depend on the other rows of the call (batch invariance, as for the
// matmul tiles), as long as the caller cuts the positions into the same chunks for it.
#pragma once

namespace shardlm::quant_detail {
namespace {

// exp(r) for |r| <= ln2 / 2: Cephes' expf polynomial (about 1 ulp); each family's K::exp reduces x = n ln2 + r
// (ln 2 in two parts, n * 0.693359375 exact) and scales the result by 2^n.
inline constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f, kLog2e = 1.44269504088896341f;
template <class K>
typename K::V exp_reduced(typename K::V r) {
  typename K::V p = K::set1(1.9875691500e-4f);
  p = K::fma(p, r, K::set1(1.3981999507e-3f));
  p = K::fma(p, r, K::set1(8.3334519073e-3f));
  p = K::fma(p, r, K::set1(4.1665795894e-2f));
  p = K::fma(p, r, K::set1(1.6666665459e-1f));
  p = K::fma(p, r, K::set1(5.0000001201e-1f));
  return K::fma(p, K::mul(r, r), K::add(r, K::set1(1.0f)));
}

// a (NV * L) = a * alpha + sum_j p[j] * v[j] over n rows of v (ldv floats apart): NV accumulators in registers.
template <class K, int NV>
void attend_accumulate(const float* p /* (n) */, int64_t n, const float* v /* (n, ldv) */, int64_t ldv, float alpha,
                       float* a /* (NV * L) */) {
  using V = typename K::V;
  V acc[NV];
  const V va = K::set1(alpha);
  for (int k = 0; k < NV; ++k) acc[k] = K::mul(K::load(a + k * K::L), va);
  for (int64_t j = 0; j < n; ++j) {
    const V pj = K::set1(p[j]);
    for (int k = 0; k < NV; ++k) acc[k] = K::fma(pj, K::load(v + j * ldv + k * K::L), acc[k]);
  }
  for (int k = 0; k < NV; ++k) K::store(a + k * K::L, acc[k]);
}

template <class K>
void attend_chunk_rows(float* s, int64_t lds, const int32_t* n_valid, int64_t n_q, const float* v, int64_t ldv,
                       int64_t hd, float scale, float* m, float* l, float* acc) {
  using V = typename K::V;
  constexpr int L = K::L;
  const V vscale = K::set1(scale);
  for (int64_t r = 0; r < n_q; ++r) {
    const int64_t n = n_valid[r];
    if (n <= 0) continue;
    float* sr = s + r * lds;
    const int64_t nv = n / L * L;
    // Scaled scores and their maximum.
    V vmax = K::set1(-__builtin_inff());
    for (int64_t j = 0; j < nv; j += L) {
      const V x = K::mul(K::load(sr + j), vscale);
      K::store(sr + j, x);
      vmax = K::max(vmax, x);
    }
    float mx = K::hmax(vmax);
    for (int64_t j = nv; j < n; ++j) {
      sr[j] *= scale;
      mx = sr[j] > mx ? sr[j] : mx;
    }
    const float m_new = mx > m[r] ? mx : m[r];
    const float alpha = K::lane0(K::exp(K::set1(m[r] - m_new)));  // 0 for the first chunk (m = -inf)
    // Weights exp(x - m_new); the last partial vector padded with -inf (weight 0).
    const V vm = K::set1(m_new);
    V vsum = K::zero();
    for (int64_t j = 0; j < nv; j += L) {
      const V p = K::exp(K::sub(K::load(sr + j), vm));
      K::store(sr + j, p);
      vsum = K::add(vsum, p);
    }
    if (nv < n) {
      alignas(64) float tail[L];
      for (int i = 0; i < L; ++i) tail[i] = nv + i < n ? sr[nv + i] - m_new : -__builtin_inff();
      const V p = K::exp(K::load(tail));
      K::store(tail, p);
      for (int64_t i = 0; i < n - nv; ++i) sr[nv + i] = tail[i];
      vsum = K::add(vsum, p);
    }
    l[r] = l[r] * alpha + K::hsum(vsum);
    m[r] = m_new;
    // acc = acc * alpha + sum_j p_j v_j, hd in blocks of 8, 4, 2, 1 vectors, then the last hd % L lanes.
    float* ar = acc + r * hd;
    int64_t i = 0;
    for (; i + 8 * L <= hd; i += 8 * L) attend_accumulate<K, 8>(sr, n, v + i, ldv, alpha, ar + i);
    if (i + 4 * L <= hd) attend_accumulate<K, 4>(sr, n, v + i, ldv, alpha, ar + i), i += 4 * L;
    if (i + 2 * L <= hd) attend_accumulate<K, 2>(sr, n, v + i, ldv, alpha, ar + i), i += 2 * L;
    if (i + L <= hd) attend_accumulate<K, 1>(sr, n, v + i, ldv, alpha, ar + i), i += L;
    for (; i < hd; ++i) {
      float a = ar[i] * alpha;
      for (int64_t j = 0; j < n; ++j) a += sr[j] * v[j * ldv + i];
      ar[i] = a;
    }
  }
}

}  // namespace
}  // namespace shardlm::quant_detail
