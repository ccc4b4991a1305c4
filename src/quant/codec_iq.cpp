// IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M (see codecs.h). The dequantizers are ggml's
// dequantize_row_iq*. The quantizers are ggml's quantize_iq* (the *_impl functions): without an importance
// matrix only the three that ggml runs so (quantize_row_iq3_xxs_ref, iq3_s_ref, iq2_s_ref), with one all
// seven (llama-quantize --imatrix; IQ2_XXS, IQ2_XS, IQ1_S, IQ1_M need it). They follow ggml operation by
// operation as in quant_ref.cpp (float evaluation order, tie-breaking of every search), because
// byte-identical output is the point. Layouts: quant/blocks_iq.h.
#include <algorithm>
#include <array>
#include <bit>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <numeric>
#include <span>
#include <vector>

#include "core/error.h"
#include "quant/blocks.h"
#include "quant/blocks_iq.h"
#include "quant/codecs.h"
#include "quant/quant.h"

namespace shardlm::quant_detail {
namespace {

#define SHARDLM_IQ_TABLE(type, name, size) inline constexpr type name[size] =
#include "quant/iq_tables.h"

void store_u32(uint8_t* p, uint32_t v) { std::memcpy(p, &v, sizeof v); }

// ggml's MAX macro, kept instead of std::max where the operand order decides which of two equal values
// (+0/-0) or a NaN comes out.
float ggml_max(float a, float b) { return a > b ? a : b; }

// ggml multiplies by +-1 rather than negating: the same bits for every finite value, kept for NaN too.
float sign_of(unsigned signs, int j) { return (signs >> j) & 1u ? -1.f : 1.f; }

// ---------------------------------------------------------------------------------------------------
// Dequantization (ggml's dequantize_row_iq*).

void dequantize_iq2_xxs(const uint8_t* x, float* y /* (n) */, int64_t n) {
  for (int64_t b = 0; b < n / kQK; ++b, x += kIQ2_XXSBytes) {
    const float d = fp16_to_fp32(load_u16(x));
    for (int ib = 0; ib < kQK / 32; ++ib) {
      const uint8_t* g = x + kIQ2_XXSQs + 8 * ib;  // 4 grid indices, then the signs+scale word
      const uint32_t aux = load_u32(g + 4);
      const float db = d * (0.5f + (aux >> 28)) * 0.25f;
      for (int l = 0; l < 4; ++l, y += 8) {
        const uint64_t grid = kIq2xxsGrid[g[l]];
        const uint8_t signs = kKsignsIq2xs[(aux >> (7 * l)) & 127];
        for (int j = 0; j < 8; ++j) y[j] = db * grid_byte(grid, j) * sign_of(signs, j);
      }
    }
  }
}

void dequantize_iq2_xs(const uint8_t* x, float* y /* (n) */, int64_t n) {
  for (int64_t b = 0; b < n / kQK; ++b, x += kIQ2_XSBytes) {
    const float d = fp16_to_fp32(load_u16(x));
    for (int ib = 0; ib < kQK / 32; ++ib) {
      const uint8_t sc = x[kIQ2_XSScales + ib];
      const float db[2] = {d * (0.5f + (sc & 0xf)) * 0.25f, d * (0.5f + (sc >> 4)) * 0.25f};
      for (int l = 0; l < 4; ++l, y += 8) {
        const uint16_t q = load_u16(x + kIQ2_XSQs + 2 * (4 * ib + l));
        const uint64_t grid = kIq2xsGrid[q & 511];
        const uint8_t signs = kKsignsIq2xs[q >> 9];
        for (int j = 0; j < 8; ++j) y[j] = db[l / 2] * grid_byte(grid, j) * sign_of(signs, j);
      }
    }
  }
}

void dequantize_iq2_s(const uint8_t* x, float* y /* (n) */, int64_t n) {
  for (int64_t b = 0; b < n / kQK; ++b, x += kIQ2_SBytes) {
    const float d = fp16_to_fp32(load_u16(x));
    for (int ib = 0; ib < kQK / 32; ++ib) {
      const uint8_t sc = x[kIQ2_SScales + ib];
      const uint8_t qh = x[kIQ2_SQh + ib];
      const float db[2] = {d * (0.5f + (sc & 0xf)) * 0.25f, d * (0.5f + (sc >> 4)) * 0.25f};
      for (int l = 0; l < 4; ++l, y += 8) {
        const int index = x[kIQ2_SQs + 4 * ib + l] | (((qh >> (2 * l)) & 3) << 8);
        const uint64_t grid = kIq2sGrid[index];
        const uint8_t signs = x[kIQ2_SSigns + 4 * ib + l];
        for (int j = 0; j < 8; ++j) y[j] = db[l / 2] * grid_byte(grid, j) * sign_of(signs, j);
      }
    }
  }
}

void dequantize_iq3_xxs(const uint8_t* x, float* y /* (n) */, int64_t n) {
  for (int64_t b = 0; b < n / kQK; ++b, x += kIQ3_XXSBytes) {
    const float d = fp16_to_fp32(load_u16(x));
    for (int ib = 0; ib < kQK / 32; ++ib) {
      const uint8_t* qs = x + kIQ3_XXSQs + 8 * ib;
      const uint32_t aux = load_u32(x + kIQ3_XXSSigns + 4 * ib);
      const float db = d * (0.5f + (aux >> 28)) * 0.5f;
      for (int l = 0; l < 4; ++l, y += 8) {
        // One sign byte covers the two 4-value grid points of these 8 values.
        const uint8_t signs = kKsignsIq2xs[(aux >> (7 * l)) & 127];
        const uint32_t grid1 = kIq3xxsGrid[qs[2 * l]];
        const uint32_t grid2 = kIq3xxsGrid[qs[2 * l + 1]];
        for (int j = 0; j < 4; ++j) {
          y[j] = db * grid_byte(grid1, j) * sign_of(signs, j);
          y[j + 4] = db * grid_byte(grid2, j) * sign_of(signs, j + 4);
        }
      }
    }
  }
}

void dequantize_iq3_s(const uint8_t* x, float* y /* (n) */, int64_t n) {
  for (int64_t b = 0; b < n / kQK; ++b, x += kIQ3_SBytes) {
    const float d = fp16_to_fp32(load_u16(x));
    for (int ib = 0; ib < kQK / 32; ++ib) {
      const uint8_t sc = x[kIQ3_SScales + ib / 2];
      const float db = d * (1 + 2 * (ib % 2 == 0 ? sc & 0xf : sc >> 4));
      const uint8_t* qs = x + kIQ3_SQs + 8 * ib;
      const uint8_t qh = x[kIQ3_SQh + ib];
      for (int l = 0; l < 4; ++l, y += 8) {
        const uint32_t grid1 = kIq3sGrid[qs[2 * l] | (((qh >> (2 * l)) & 1) << 8)];
        const uint32_t grid2 = kIq3sGrid[qs[2 * l + 1] | (((qh >> (2 * l + 1)) & 1) << 8)];
        const uint8_t signs = x[kIQ3_SSigns + 4 * ib + l];
        for (int j = 0; j < 4; ++j) {
          y[j] = db * grid_byte(grid1, j) * sign_of(signs, j);
          y[j + 4] = db * grid_byte(grid2, j) * sign_of(signs, j + 4);
        }
      }
    }
  }
}

void dequantize_iq1_s(const uint8_t* x, float* y /* (n) */, int64_t n) {
  for (int64_t b = 0; b < n / kQK; ++b, x += kIQ1_SBytes) {
    const float d = fp16_to_fp32(load_u16(x));
    for (int ib = 0; ib < kQK / 32; ++ib) {
      const uint16_t qh = load_u16(x + kIQ1_SQh + 2 * ib);
      const float dl = d * (2 * ((qh >> 12) & 7) + 1);
      const float delta = qh & 0x8000 ? -SHARDLM_IQ1S_DELTA : SHARDLM_IQ1S_DELTA;
      for (int l = 0; l < 4; ++l, y += 8) {
        const uint64_t grid = kIq1sGrid[x[kIQ1_SQs + 4 * ib + l] | (((qh >> (3 * l)) & 7) << 8)];
        for (int j = 0; j < 8; ++j) y[j] = dl * (static_cast<int8_t>(grid_byte(grid, j)) + delta);
      }
    }
  }
}

void dequantize_iq1_m(const uint8_t* x, float* y /* (n) */, int64_t n) {
  for (int64_t b = 0; b < n / kQK; ++b, x += kIQ1_MBytes) {
    uint16_t sc[4];
    for (int i = 0; i < 4; ++i) sc[i] = load_u16(x + kIQ1_MScales + 2 * i);
    // The super-block scale has no field of its own: its 16 bits are the top nibbles of the four words.
    const uint16_t d16 = static_cast<uint16_t>((sc[0] >> 12) | ((sc[1] >> 8) & 0x00f0) |
                                               ((sc[2] >> 4) & 0x0f00) | (sc[3] & 0xf000));
    const float d = fp16_to_fp32(d16);
    for (int ib = 0; ib < kQK / 32; ++ib) {
      const uint16_t s = sc[ib / 2];
      const float dl[2] = {d * (2 * ((s >> (6 * (ib % 2))) & 7) + 1),
                           d * (2 * ((s >> (6 * (ib % 2) + 3)) & 7) + 1)};
      for (int l = 0; l < 4; ++l, y += 8) {
        // qh byte l/2 serves 16 values: index l's top bits in its low or high nibble, and above them
        // the sign of the shift.
        const int nib = (x[kIQ1_MQh + 2 * ib + l / 2] >> (4 * (l % 2))) & 0xf;
        const uint64_t grid = kIq1sGrid[x[kIQ1_MQs + 4 * ib + l] | ((nib & 7) << 8)];
        const float delta = nib & 8 ? -SHARDLM_IQ1S_DELTA : SHARDLM_IQ1S_DELTA;
        for (int j = 0; j < 8; ++j) y[j] = dl[l / 2] * (static_cast<int8_t>(grid_byte(grid, j)) + delta);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Grid search (ggml's iq2xs_init_impl / iq3xs_init_impl and *_find_best_neighbour).
//
// A grid point is `dim` values, each one of a few odd levels 2l+1 (the grid's bytes are a monotone
// image of l). The quantizers round each value to a level l, pack the levels into a key (`bits` per
// value) and look the key up: either it is a grid point, or it has a precomputed neighbour list, the
// grid points at the `nwant` smallest distinct squared distances, in order of (distance, grid index).
// That order matters: the weighted search keeps the first of equally good candidates.
class GridSearch {
 public:
  template <typename Entry>
  GridSearch(const Entry* grid, int grid_size, int dim, int bits, const std::vector<uint8_t>& level_bytes,
             int max_level, int nwant);

  int dim() const { return dim_; }

  // Grid index of the point with these levels (dim of them), or -1.
  int index(const int8_t* levels) const { return on_grid_[key(levels)]; }

  // The neighbour list of off-grid levels (dim), for searches that score candidates their own way (IQ1).
  std::span<const uint16_t> neighbours(const int8_t* levels) const {
    const size_t k = key(levels);
    return {neighbours_.data() + first_[k], first_[k + 1] - first_[k]};
  }

  // Grid point g as 2l+1 per value (dim).
  const int8_t* point(int g) const { return &points_[static_cast<size_t>(g) * dim_]; }

  // Replaces the off-grid levels (dim) by those of the neighbour closest to xval (dim) at `scale` under
  // weights w (dim) (ggml's iq2/iq3_find_best_neighbour).
  void snap_to_neighbour(int8_t* levels, const float* xval, const float* w, float scale) const {
    const size_t k = key(levels);
    float best_d2 = FLT_MAX;
    int best = -1;
    for (uint32_t n = first_[k]; n < first_[k + 1]; ++n) {
      const int8_t* pg = &points_[static_cast<size_t>(neighbours_[n]) * dim_];
      float d2 = 0;
      for (int i = 0; i < dim_; ++i) {
        const float q = pg[i];
        const float diff = scale * q - xval[i];
        d2 += w[i] * diff * diff;
      }
      if (d2 < best_d2) {
        best_d2 = d2;
        best = neighbours_[n];
      }
    }
    // Only inf/NaN input (or distances overflowing float) leaves no candidate: ggml asserts there, we
    // take the first neighbour.
    if (best < 0) best = neighbours_[first_[k]];
    const int8_t* pg = &points_[static_cast<size_t>(best) * dim_];
    for (int i = 0; i < dim_; ++i) levels[i] = static_cast<int8_t>((pg[i] - 1) / 2);
  }

 private:
  size_t key(const int8_t* levels) const {
    size_t u = 0;
    for (int i = 0; i < dim_; ++i) u |= static_cast<size_t>(levels[i]) << (bits_ * i);
    return u;
  }

  int dim_, bits_;
  std::vector<int8_t> points_;        // (grid_size, dim): 2l+1 per value
  std::vector<int32_t> on_grid_;      // (1 << dim*bits): grid index of each key, or -1
  std::vector<uint32_t> first_;       // (1 << dim*bits) + 1: key u's neighbours are [first_[u], first_[u+1])
  std::vector<uint16_t> neighbours_;  // grid indices
};

template <typename Entry>
GridSearch::GridSearch(const Entry* grid, int grid_size, int dim, int bits,
                       const std::vector<uint8_t>& level_bytes, int max_level, int nwant)
    : dim_(dim), bits_(bits), points_(static_cast<size_t>(grid_size) * dim) {
  const size_t nkeys = size_t{1} << (dim * bits);
  on_grid_.assign(nkeys, -1);
  for (int g = 0; g < grid_size; ++g) {
    size_t u = 0;
    for (int i = 0; i < dim; ++i) {
      const auto it = std::find(level_bytes.begin(), level_bytes.end(), grid_byte(grid[g], i));
      SHARDLM_CHECK(it != level_bytes.end(), "IQ grid entry ", g, " has a byte outside its levels");
      const int l = static_cast<int>(it - level_bytes.begin());
      points_[static_cast<size_t>(g) * dim + i] = static_cast<int8_t>(2 * l + 1);
      u |= static_cast<size_t>(l) << (bits * i);
    }
    on_grid_[u] = g;
  }
  // Neighbour lists only for the keys the quantizer can form (levels <= max_level); ggml also lists the
  // unreachable ones, which changes nothing but the build time.
  first_.assign(nkeys + 1, 0);
  std::vector<int> dist2(grid_size);
  std::vector<std::array<int, 2>> near;  // (distance, grid index)
  for (size_t u = 0; u < nkeys; ++u) {
    first_[u] = static_cast<uint32_t>(neighbours_.size());
    int8_t pos[8];
    bool reachable = true;
    for (int i = 0; i < dim; ++i) {
      const int l = static_cast<int>(u >> (bits * i)) & ((1 << bits) - 1);
      reachable = reachable && l <= max_level;
      pos[i] = static_cast<int8_t>(2 * l + 1);
    }
    if (!reachable || on_grid_[u] >= 0) continue;
    // The nwant (<= 3) smallest distinct distances, ascending; then every point within the largest.
    std::array<int, 3> lows{};
    int nlows = 0;
    for (int g = 0; g < grid_size; ++g) {
      int d2 = 0;
      for (int i = 0; i < dim; ++i) {
        const int diff = points_[static_cast<size_t>(g) * dim + i] - pos[i];
        d2 += diff * diff;
      }
      dist2[g] = d2;
      int at = 0;
      while (at < nlows && lows[at] < d2) ++at;
      if (at < nlows && lows[at] == d2) continue;
      if (at >= nwant) continue;
      for (int m = std::min(nlows, nwant - 1); m > at; --m) lows[m] = lows[m - 1];
      lows[at] = d2;
      nlows = std::min(nlows + 1, nwant);
    }
    near.clear();
    for (int g = 0; g < grid_size; ++g)
      if (dist2[g] <= lows[nlows - 1]) near.push_back({dist2[g], g});
    std::sort(near.begin(), near.end());
    for (const auto& [d2, g] : near) neighbours_.push_back(static_cast<uint16_t>(g));
  }
  first_[nkeys] = static_cast<uint32_t>(neighbours_.size());
}

// Built on first use (the IQ2_S and IQ1 ones take a few tens of milliseconds); C++ makes the initialisation
// of a function-local static thread-safe. The parameters are ggml's iq2xs_init_impl / iq3xs_init_impl ones:
// the quantizers round to levels 0..kMaxQ-1, and nwant is 2 for IQ2_XXS/IQ2_XS, 1 for IQ2_S, 3 for IQ1.
const GridSearch& iq2xxs_search() {
  static const GridSearch s(kIq2xxsGrid, 256, 8, 2, {0x08, 0x19, 0x2b, 0x3e}, 2, 2);
  return s;
}

const GridSearch& iq2xs_search() {
  static const GridSearch s(kIq2xsGrid, 512, 8, 2, {0x08, 0x19, 0x2b, 0x3e}, 2, 2);
  return s;
}

// IQ1_S and IQ1_M share one grid; its bytes are the int8 values -1, 0, 1.
const GridSearch& iq1s_search() {
  static const GridSearch s(kIq1sGrid, 2048, 8, 2, {0xff, 0x00, 0x01}, 2, 3);
  return s;
}

const GridSearch& iq2s_search() {
  static const GridSearch s(kIq2sGrid, 1024, 8, 2, {0x08, 0x19, 0x2b, 0x3e}, 2, 1);
  return s;
}

const GridSearch& iq3xxs_search() {
  static const GridSearch s(kIq3xxsGrid, 256, 4, 3, {0x04, 0x0c, 0x14, 0x1c, 0x24, 0x2c, 0x34, 0x3e}, 7, 2);
  return s;
}

const GridSearch& iq3s_search() {
  static const GridSearch s(kIq3sGrid, 512, 4, 3, {1, 3, 5, 7, 9, 11, 13, 15}, 7, 3);
  return s;
}

// The scale search of ggml's quantize_row_iq3_xxs_impl / iq3_s_impl / iq2_s_impl, which differ only in
// these parameters.
struct FitParams {
  int n;                // values in the group (32, or 16 for IQ2_S)
  int kmax_q;           // levels 0..kmax_q-1
  int steps;            // trial inverse scales (2*kmax_q - 1 + is*step) / max for is in [-steps, steps]
  float step;
  bool assume_on_grid;  // the on-grid flags before any trial is accepted
  bool refit_all;       // after the trials, re-snap every point, not only those that were off the grid
  bool refit_always;    // re-snap even when every point of the best trial was on the grid (IQ2_XXS)
};

// The level l of each of `dim` magnitudes at inverse scale id: the nearest odd multiple 2l+1 of the
// scale, clamped to 0..kmax_q-1.
void round_to_levels(const float* xval, int dim, float id, int kmax_q, int8_t* levels) {
  for (int i = 0; i < dim; ++i)
    levels[i] = static_cast<int8_t>(std::clamp(nearest_int(0.5f * (id * xval[i] - 1)), 0, kmax_q - 1));
}

// Fits one group of magnitudes xval (n; signs already split off, max > 0 their maximum) to grid points:
// at each trial scale every point of dim values is rounded to levels, and replaced by its best neighbour
// when off the grid; the trial with the best weighted least-squares fit wins. The points that needed a
// neighbour (all points with refit_all) are then re-snapped at the fitted scale and the scale refitted.
// `max` sets the trial scales; scale0 is the result if no trial fits (ggml: max/(2*kmax_q-1), or IQ2_XXS's
// make_qp_quants scale). Returns the scale; L (n) gets the levels, each point of them on the grid.
float fit_group(const GridSearch& gs, const FitParams& p, const float* xval, const float* weight,
                const float* waux, float max, float scale0, int8_t* L) {
  const int dim = gs.dim();
  const int npoints = p.n / dim;
  int8_t laux[32];
  bool on_grid[8], on_grid_aux[8];
  std::fill(L, L + p.n, int8_t{0});
  float best = 0;
  float scale = scale0;
  std::fill(on_grid, on_grid + npoints, p.assume_on_grid);
  for (int is = -p.steps; is <= p.steps; ++is) {
    const float id = (2 * p.kmax_q - 1 + is * p.step) / max;
    const float this_scale = 1 / id;
    for (int k = 0; k < npoints; ++k) {
      int8_t* lk = laux + dim * k;
      round_to_levels(xval + dim * k, dim, id, p.kmax_q, lk);
      on_grid_aux[k] = gs.index(lk) >= 0;
      if (!on_grid_aux[k]) gs.snap_to_neighbour(lk, xval + dim * k, waux + dim * k, this_scale);
    }
    float sumqx = 0, sumq2 = 0;
    for (int i = 0; i < p.n; ++i) {
      const float w = weight[i];
      const float q = 2 * laux[i] + 1;
      sumqx += w * xval[i] * q;
      sumq2 += w * q * q;
    }
    if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
      scale = sumqx / sumq2;
      best = scale * sumqx;
      std::copy(laux, laux + p.n, L);
      std::copy(on_grid_aux, on_grid_aux + npoints, on_grid);
    }
  }
  const bool any_off = std::find(on_grid, on_grid + npoints, false) != on_grid + npoints;
  if ((any_off || p.refit_always) && scale > 0) {
    const float id = 1 / scale;
    for (int k = 0; k < npoints; ++k) {
      if (!p.refit_all && on_grid[k]) continue;
      int8_t* lk = L + dim * k;
      round_to_levels(xval + dim * k, dim, id, p.kmax_q, lk);
      if (gs.index(lk) < 0) gs.snap_to_neighbour(lk, xval + dim * k, waux + dim * k, scale);
    }
    float sumqx = 0, sumq2 = 0;
    for (int i = 0; i < p.n; ++i) {
      const float w = weight[i];
      const float q = 2 * L[i] + 1;
      sumqx += w * xval[i] * q;
      sumq2 += w * q * q;
    }
    if (sumq2 > 0) scale = sumqx / sumq2;
  }
  return scale;
}

// The grid index of every point of a fitted group (L (n) holds only grid points by construction).
int grid_index_of(const GridSearch& gs, const int8_t* levels) {
  const int g = gs.index(levels);
  SHARDLM_CHECK(g >= 0, "IQ quantizer produced a point off the grid");
  return g;
}

// Sum of x^2 over the super-block, in ggml's order.
float super_block_sumx2(const float* x /* (kQK) */) {
  float sumx2 = 0;
  for (int i = 0; i < kQK; ++i) sumx2 += x[i] * x[i];
  return sumx2;
}

// 2 * mean(x^2) over the super-block: IQ2_S's weights get a quarter of it as a floor, and the importance
// weights of every type but IQ2_XXS/IQ2_XS add it to x^2.
float super_block_sigma2(const float* x /* (kQK) */) { return 2 * super_block_sumx2(x) / kQK; }

// With an importance matrix ggml weighs each error by the column's importance times the value's size,
// softened by the super-block's spread so that near-zero values still count.
void importance_weights(const float* xb /* (n) */, const float* qw /* (n) */, float sigma2, int n,
                        float* weight /* (n) */) {
  for (int i = 0; i < n; ++i) weight[i] = qw[i] * std::sqrt(sigma2 + xb[i] * xb[i]);
}

// Splits the signs off one group of 8 (xb, weight: 8) into xval (8) as IQ2_XXS/IQ2_XS/IQ3_XXS store them: a
// 7-bit index into the even-parity sign bytes. With an odd number of negatives, the value that costs least
// to get wrong (smallest weight*x^2, first on ties) keeps its wrong sign as a negative magnitude.
uint8_t split_parity_signs(const float* xb, const float* weight, float* xval) {
  int nflip = 0;
  uint8_t s = 0;
  for (int i = 0; i < 8; ++i) {
    if (xb[i] >= 0) {
      xval[i] = xb[i];
    } else {
      xval[i] = -xb[i];
      ++nflip;
      s |= static_cast<uint8_t>(1 << i);
    }
  }
  if (nflip % 2) {
    int imin = 0;
    float min = weight[0] * xb[0] * xb[0];
    for (int i = 1; i < 8; ++i) {
      const float ax = weight[i] * xb[i] * xb[i];
      if (ax < min) {
        min = ax;
        imin = i;
      }
    }
    xval[imin] = -xval[imin];
    s ^= static_cast<uint8_t>(1 << imin);
  }
  return s & 127;
}

// ---------------------------------------------------------------------------------------------------
// Quantization.

void quantize_iq3_xxs(const float* x /* (n) */, const float* qw /* (n) or null */, uint8_t* y, int64_t n) {
  constexpr float kGroupMaxEps = 1e-8f;  // ggml's GROUP_MAX_EPS_IQ3_XXS
  const GridSearch& gs = iq3xxs_search();
  const FitParams fp{
      .n = 32, .kmax_q = 8, .steps = 15, .step = 0.2f,
      .assume_on_grid = true, .refit_all = false, .refit_always = false};
  float scales[kQK / 32];
  float weight[32], waux[32], xval[32];
  int8_t L[32];
  for (int64_t b = 0; b < n / kQK; ++b, x += kQK, y += kIQ3_XXSBytes) {
    std::memset(y, 0, kIQ3_XXSBytes);
    float max_scale = 0;
    const float sigma2 = super_block_sigma2(x);
    for (int ib = 0; ib < kQK / 32; ++ib) {
      const float* xb = x + 32 * ib;
      if (qw) {
        importance_weights(xb, qw + b * kQK + 32 * ib, sigma2, 32, weight);
      } else {
        for (int i = 0; i < 32; ++i) weight[i] = xb[i] * xb[i];
      }
      for (int i = 0; i < 32; ++i) waux[i] = std::sqrt(weight[i]);
      uint8_t block_signs[4];
      for (int k = 0; k < 4; ++k)
        block_signs[k] = split_parity_signs(xb + 8 * k, weight + 8 * k, xval + 8 * k);
      float max = xval[0];
      for (int i = 1; i < 32; ++i) max = ggml_max(max, xval[i]);
      if (max < kGroupMaxEps) {
        scales[ib] = 0;  // indices and signs stay 0
        continue;
      }
      float scale = fit_group(gs, fp, xval, weight, waux, max, max / (2 * fp.kmax_q - 1), L);
      if (scale < 0) {
        // ggml: "should never happen"; the scale is stored unsigned, so flip it and the signs.
        scale = -scale;
        for (int k = 0; k < 4; ++k) block_signs[k] = static_cast<uint8_t>(~block_signs[k] & 127);
      }
      for (int k = 0; k < 8; ++k)
        y[kIQ3_XXSQs + 8 * ib + k] = static_cast<uint8_t>(grid_index_of(gs, L + 4 * k));
      store_u32(y + kIQ3_XXSSigns + 4 * ib, block_signs[0] | (block_signs[1] << 7) | (block_signs[2] << 14) |
                                               (block_signs[3] << 21));
      scales[ib] = scale;
      max_scale = ggml_max(max_scale, scale);
    }
    if (!max_scale) {
      std::memset(y, 0, kIQ3_XXSBytes);  // ggml drops what the zero-scale groups wrote
      continue;
    }
    const float d = max_scale / 31;
    store_u16(y, fp32_to_fp16(d * 1.0125f));  // ggml's fudge factor
    const float id = 1 / d;
    for (int ib = 0; ib < kQK / 32; ++ib) {
      const int l = std::clamp(nearest_int(0.5f * (id * scales[ib] - 1)), 0, 15);
      uint8_t* w = y + kIQ3_XXSSigns + 4 * ib;
      store_u32(w, load_u32(w) | static_cast<uint32_t>(l) << 28);
    }
  }
}

void quantize_iq3_s(const float* x /* (n) */, const float* qw /* (n) or null */, uint8_t* y, int64_t n) {
  const GridSearch& gs = iq3s_search();
  const FitParams fp{
      .n = 32, .kmax_q = 8, .steps = 9, .step = 0.2f,
      .assume_on_grid = false, .refit_all = true, .refit_always = false};
  float scales[kQK / 32];
  float weight[32], waux[32], xval[32];
  int8_t L[32];
  for (int64_t b = 0; b < n / kQK; ++b, x += kQK, y += kIQ3_SBytes) {
    std::memset(y, 0, kIQ3_SBytes);
    // ggml advances its qs/signs write pointers at the end of a group, after the `continue` of an
    // all-zero group: the groups after one land a slot early (and decode misplaced). Reproduced, since
    // the bytes must be llama.cpp's; the qh bits and scales are placed by group number.
    uint8_t* qs = y + kIQ3_SQs;
    uint8_t* signs = y + kIQ3_SSigns;
    float max_scale = 0;
    const float sigma2 = super_block_sigma2(x);
    for (int ib = 0; ib < kQK / 32; ++ib) {
      const float* xb = x + 32 * ib;
      if (qw) {
        importance_weights(xb, qw + b * kQK + 32 * ib, sigma2, 32, weight);
      } else {
        for (int i = 0; i < 32; ++i) weight[i] = xb[i] * xb[i];
      }
      for (int i = 0; i < 32; ++i) waux[i] = std::sqrt(weight[i]);
      uint8_t block_signs[4];  // IQ3_S stores whole sign bytes: no parity constraint
      for (int k = 0; k < 4; ++k) {
        uint8_t s = 0;
        for (int i = 0; i < 8; ++i) {
          if (xb[8 * k + i] >= 0) {
            xval[8 * k + i] = xb[8 * k + i];
          } else {
            xval[8 * k + i] = -xb[8 * k + i];
            s |= static_cast<uint8_t>(1 << i);
          }
        }
        block_signs[k] = s;
      }
      float max = xval[0];
      for (int i = 1; i < 32; ++i) max = ggml_max(max, xval[i]);
      if (!max) {
        scales[ib] = 0;
        continue;
      }
      float scale = fit_group(gs, fp, xval, weight, waux, max, max / (2 * fp.kmax_q - 1), L);
      if (scale < 0) {
        scale = -scale;
        for (int k = 0; k < 4; ++k) block_signs[k] = static_cast<uint8_t>(~block_signs[k]);
      }
      for (int k = 0; k < 8; ++k) {
        const int g = grid_index_of(gs, L + 4 * k);
        qs[k] = static_cast<uint8_t>(g & 255);
        y[kIQ3_SQh + ib] |= static_cast<uint8_t>((g >> 8) << k);
      }
      qs += 8;
      std::memcpy(signs, block_signs, 4);
      signs += 4;
      scales[ib] = scale;
      max_scale = ggml_max(max_scale, scale);
    }
    if (!max_scale) continue;
    const float d = max_scale / 31;
    store_u16(y, fp32_to_fp16(d * 1.033f));  // ggml's fudge factor
    const float id = 1 / d;
    for (int ib = 0; ib < kQK / 32; ib += 2) {
      const int l1 = std::clamp(nearest_int(0.5f * (id * scales[ib] - 1)), 0, 15);
      const int l2 = std::clamp(nearest_int(0.5f * (id * scales[ib + 1] - 1)), 0, 15);
      y[kIQ3_SScales + ib / 2] = static_cast<uint8_t>(l1 | (l2 << 4));
    }
  }
}

void quantize_iq2_s(const float* x /* (n) */, const float* qw /* (n) or null */, uint8_t* y, int64_t n) {
  constexpr float kGroupMaxEps = 1e-8f;  // ggml's GROUP_MAX_EPS_IQ2_S
  const GridSearch& gs = iq2s_search();
  const FitParams fp{
      .n = 16, .kmax_q = 3, .steps = 9, .step = 0.1f,
      .assume_on_grid = true, .refit_all = false, .refit_always = false};
  float scales[kQK / 16];
  float weight[16], waux[16], xval[16];
  int8_t L[16];
  for (int64_t b = 0; b < n / kQK; ++b, x += kQK, y += kIQ2_SBytes) {
    std::memset(y, 0, kIQ2_SBytes);
    float max_scale = 0;
    const float sigma2 = super_block_sigma2(x);
    for (int ib = 0; ib < kQK / 16; ++ib) {
      const float* xb = x + 16 * ib;
      if (qw) {
        importance_weights(xb, qw + b * kQK + 16 * ib, sigma2, 16, weight);
      } else {
        // Without an importance matrix ggml weighs by x^2 plus a floor from the super-block's spread.
        for (int i = 0; i < 16; ++i) weight[i] = 0.25f * sigma2 + xb[i] * xb[i];
      }
      for (int i = 0; i < 16; ++i) waux[i] = std::sqrt(weight[i]);
      uint8_t block_signs[2];
      for (int k = 0; k < 2; ++k) {
        uint8_t s = 0;
        for (int i = 0; i < 8; ++i) {
          if (xb[8 * k + i] >= 0) {
            xval[8 * k + i] = xb[8 * k + i];
          } else {
            xval[8 * k + i] = -xb[8 * k + i];
            s |= static_cast<uint8_t>(1 << i);
          }
        }
        block_signs[k] = s;
      }
      float max = xval[0];
      for (int i = 1; i < 16; ++i) max = ggml_max(max, xval[i]);
      if (max < kGroupMaxEps) {
        scales[ib] = 0;
        continue;
      }
      float scale = fit_group(gs, fp, xval, weight, waux, max, max / (2 * fp.kmax_q - 1), L);
      if (scale < 0) {
        scale = -scale;
        for (int k = 0; k < 2; ++k) block_signs[k] = static_cast<uint8_t>(~block_signs[k]);
      }
      for (int k = 0; k < 2; ++k) {
        const int g = grid_index_of(gs, L + 8 * k);
        const int i8 = 2 * ib + k;  // which group of 8
        y[kIQ2_SQs + i8] = static_cast<uint8_t>(g & 255);
        y[kIQ2_SQh + i8 / 4] |= static_cast<uint8_t>((g >> 8) << (2 * (i8 % 4)));
        y[kIQ2_SSigns + i8] = block_signs[k];
      }
      scales[ib] = scale;
      max_scale = ggml_max(max_scale, scale);
    }
    if (!max_scale) continue;
    const float d = max_scale / 31;
    store_u16(y, fp32_to_fp16(d * 0.9875f));  // ggml's fudge factor
    const float id = 1 / d;
    for (int ib = 0; ib < kQK / 16; ++ib) {
      const int l = std::clamp(nearest_int(0.5f * (id * scales[ib] - 1)), 0, 15);
      y[kIQ2_SScales + ib / 2] |= static_cast<uint8_t>(l << (4 * (ib % 2)));
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Quantization with an importance matrix only (ggml's quantize_row_iq2_xxs_impl, iq2_xs_impl, iq1_s_impl,
// iq1_m_impl; llama-quantize refuses these types without one).

// ggml's make_qp_quants: the weighted least-squares scale of non-negative levels 0..nmax for x (n), from a
// few trial scales and then coordinate descent on the levels. L (n) is uint8 as in ggml: IQ2_XXS passes
// magnitudes that may include one negative (see split_parity_signs), whose negative level wraps around
// in L and so changes later sums; kept because only ggml's exact scale gives its bytes.
float make_qp_quants(int n, int nmax, const float* x, uint8_t* L, const float* w) {
  constexpr float kGroupMaxEps = 1e-15f;  // ggml's GROUP_MAX_EPS
  float max = 0;
  for (int i = 0; i < n; ++i) max = ggml_max(max, x[i]);
  if (max < kGroupMaxEps) {
    std::fill(L, L + n, uint8_t{0});
    return 0.f;
  }
  float iscale = nmax / max;
  for (int i = 0; i < n; ++i) L[i] = static_cast<uint8_t>(nearest_int(iscale * x[i]));
  const float scale = 1 / iscale;
  float best_mse = 0;
  for (int i = 0; i < n; ++i) {
    const float diff = x[i] - scale * L[i];
    best_mse += w[i] * diff * diff;
  }
  for (int is = -4; is <= 4; ++is) {
    if (is == 0) continue;
    const float iscale_is = (0.1f * is + nmax) / max;
    const float scale_is = 1 / iscale_is;
    float mse = 0;
    for (int i = 0; i < n; ++i) {
      const int l = std::min(nmax, nearest_int(iscale_is * x[i]));
      const float diff = x[i] - scale_is * l;
      mse += w[i] * diff * diff;
    }
    if (mse < best_mse) {
      best_mse = mse;
      iscale = iscale_is;
    }
  }
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    const int l = std::min(nmax, nearest_int(iscale * x[i]));
    L[i] = static_cast<uint8_t>(l);
    sumlx += w[i] * x[i] * l;
    suml2 += w[i] * l * l;
  }
  for (int itry = 0; itry < 5; ++itry) {
    int n_changed = 0;
    for (int i = 0; i < n; ++i) {
      float slx = sumlx - w[i] * x[i] * L[i];
      float sl2 = suml2 - w[i] * L[i] * L[i];
      if (slx > 0 && sl2 > 0) {
        const int new_l = std::min(nmax, nearest_int(x[i] * sl2 / slx));
        if (new_l != L[i]) {
          slx += w[i] * x[i] * new_l;
          sl2 += w[i] * new_l * new_l;
          if (slx * slx * suml2 > sumlx * sumlx * sl2) {
            L[i] = static_cast<uint8_t>(new_l);
            sumlx = slx;
            suml2 = sl2;
            ++n_changed;
          }
        }
      }
    }
    if (!n_changed) break;
  }
  return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

// The 4-bit group scales of IQ2_XXS/IQ2_XS/IQ3: the level l with (2l+1) * d closest to each.
int group_scale_level(float id, float scale) {
  return std::clamp(nearest_int(0.5f * (id * scale - 1)), 0, 15);
}

void quantize_iq2_xxs(const float* x /* (n) */, const float* qw /* (n) */, uint8_t* y, int64_t n) {
  constexpr float kGroupMaxEps = 1e-15f;  // ggml's GROUP_MAX_EPS
  constexpr int kMaxQ = 3;
  const GridSearch& gs = iq2xxs_search();
  // Trials around the make_qp_quants fit, and every point re-snapped at the chosen scale.
  const FitParams fp{.n = 32, .kmax_q = kMaxQ, .steps = 6, .step = 0.1f, .assume_on_grid = true,
                     .refit_all = true, .refit_always = true};
  float scales[kQK / 32];
  float weight[32], waux[32], xval[32];
  int8_t L[32];
  uint8_t qp_levels[32];
  for (int64_t b = 0; b < n / kQK; ++b, x += kQK, qw += kQK, y += kIQ2_XXSBytes) {
    std::memset(y, 0, kIQ2_XXSBytes);
    // Per 32 values: u32 of 4 grid indices, u32 of 4 sign indices and the scale (see blocks_iq.h).
    uint32_t q2[2 * (kQK / 32)] = {};
    float max_scale = 0;
    // IQ2_XXS/IQ2_XS soften the importance by mean(x^2), not twice it as the other types.
    const float sigma2 = super_block_sumx2(x) / kQK;
    for (int ib = 0; ib < kQK / 32; ++ib) {
      const float* xb = x + 32 * ib;
      importance_weights(xb, qw + 32 * ib, sigma2, 32, weight);
      for (int i = 0; i < 32; ++i) waux[i] = std::sqrt(weight[i]);
      uint8_t block_signs[4];
      for (int k = 0; k < 4; ++k)
        block_signs[k] = split_parity_signs(xb + 8 * k, weight + 8 * k, xval + 8 * k);
      float max = xval[0];
      for (int i = 1; i < 32; ++i) max = ggml_max(max, xval[i]);
      scales[ib] = 0;
      if (max < kGroupMaxEps) continue;
      const float scale0 = make_qp_quants(32, kMaxQ + 1, xval, qp_levels, weight);
      const float eff_max = scale0 * kMaxQ;
      if (eff_max <= 0) continue;
      float scale = fit_group(gs, fp, xval, weight, waux, eff_max, scale0, L);
      if (scale < 0) {
        // ggml: "should never happen"; the scale is stored unsigned, so flip it and the signs.
        scale = -scale;
        for (int k = 0; k < 4; ++k) block_signs[k] = static_cast<uint8_t>(~block_signs[k] & 127);
      }
      for (int k = 0; k < 4; ++k) {
        q2[2 * ib] |= static_cast<uint32_t>(grid_index_of(gs, L + 8 * k)) << (8 * k);
        q2[2 * ib + 1] |= static_cast<uint32_t>(block_signs[k]) << (7 * k);
      }
      scales[ib] = scale;
      max_scale = ggml_max(max_scale, scale);
    }
    if (!max_scale) continue;  // d and every index stay 0
    const float d = max_scale / 31;
    store_u16(y, fp32_to_fp16(d));
    const float id = 1 / d;
    for (int ib = 0; ib < kQK / 32; ++ib)
      q2[2 * ib + 1] |= static_cast<uint32_t>(group_scale_level(id, scales[ib])) << 28;
    for (int i = 0; i < 2 * (kQK / 32); ++i) store_u32(y + kIQ2_XXSQs + 4 * i, q2[i]);
  }
}

void quantize_iq2_xs(const float* x /* (n) */, const float* qw /* (n) */, uint8_t* y, int64_t n) {
  constexpr float kGroupMaxEps = 1e-15f;  // ggml's GROUP_MAX_EPS
  const GridSearch& gs = iq2xs_search();
  const FitParams fp{.n = 16, .kmax_q = 3, .steps = 9, .step = 0.1f, .assume_on_grid = true,
                     .refit_all = false, .refit_always = false};
  float scales[kQK / 16];
  float weight[16], waux[16], xval[16];
  int8_t L[16];
  for (int64_t b = 0; b < n / kQK; ++b, x += kQK, qw += kQK, y += kIQ2_XSBytes) {
    std::memset(y, 0, kIQ2_XSBytes);
    uint16_t q2[2 * (kQK / 16)] = {};  // per 8 values: grid index | sign index << 9
    float max_scale = 0;
    const float sigma2 = super_block_sumx2(x) / kQK;
    for (int ib = 0; ib < kQK / 16; ++ib) {
      const float* xb = x + 16 * ib;
      importance_weights(xb, qw + 16 * ib, sigma2, 16, weight);
      for (int i = 0; i < 16; ++i) waux[i] = std::sqrt(weight[i]);
      uint8_t block_signs[2];
      for (int k = 0; k < 2; ++k)
        block_signs[k] = split_parity_signs(xb + 8 * k, weight + 8 * k, xval + 8 * k);
      float max = xval[0];
      for (int i = 1; i < 16; ++i) max = ggml_max(max, xval[i]);
      scales[ib] = 0;
      if (max < kGroupMaxEps) continue;
      float scale = fit_group(gs, fp, xval, weight, waux, max, max / (2 * fp.kmax_q - 1), L);
      if (scale < 0) {
        scale = -scale;
        for (int k = 0; k < 2; ++k) block_signs[k] = static_cast<uint8_t>(~block_signs[k] & 127);
      }
      for (int k = 0; k < 2; ++k)
        q2[2 * ib + k] = static_cast<uint16_t>(grid_index_of(gs, L + 8 * k) | (block_signs[k] << 9));
      scales[ib] = scale;
      max_scale = ggml_max(max_scale, scale);
    }
    if (!max_scale) continue;
    const float d = max_scale / 31;
    store_u16(y, fp32_to_fp16(d));
    const float id = 1 / d;
    for (int ib = 0; ib < kQK / 16; ++ib)
      y[kIQ2_XSScales + ib / 2] |= static_cast<uint8_t>(group_scale_level(id, scales[ib]) << (4 * (ib % 2)));
    for (int i = 0; i < 2 * (kQK / 16); ++i) store_u16(y + kIQ2_XSQs + 2 * i, q2[i]);
  }
}

// IQ1 values are d * (2s+1) * (g + shift) with g in {-1, 0, 1} and shift = +-delta per 8 (IQ1_M) or 32
// (IQ1_S) values: the three levels of a positive and of a negative shift.
constexpr float kIq1Plus[3] = {-1 + SHARDLM_IQ1S_DELTA, SHARDLM_IQ1S_DELTA, 1 + SHARDLM_IQ1S_DELTA};
constexpr float kIq1Minus[3] = {-1 - SHARDLM_IQ1S_DELTA, -SHARDLM_IQ1S_DELTA, 1 - SHARDLM_IQ1S_DELTA};

// ggml's iq1_find_best_neighbour2: replaces the off-grid levels (8) by those of the neighbour whose values
// xs[level] * scale are closest to xb (8) under weight (8); first of equals. Returns its grid index.
int iq1_snap_to_neighbour(const GridSearch& gs, int8_t* levels, const float* xb, const float* weight,
                          float scale, const float* xs) {
  const std::span<const uint16_t> nbrs = gs.neighbours(levels);
  float best_d2 = FLT_MAX;
  int best = -1;
  for (const uint16_t g : nbrs) {
    const int8_t* pg = gs.point(g);
    float d2 = 0;
    for (int i = 0; i < 8; ++i) {
      const float q = xs[(pg[i] - 1) / 2];
      const float diff = scale * q - xb[i];
      d2 += weight[i] * diff * diff;
    }
    if (d2 < best_d2) {
      best_d2 = d2;
      best = g;
    }
  }
  // Only inf/NaN distances leave no candidate; ggml then scans the whole grid with an out-of-bounds read
  // (xval indexed by grid index), which cannot be reproduced: take the first neighbour.
  if (best < 0) best = nbrs[0];
  const int8_t* pg = gs.point(best);
  for (int i = 0; i < 8; ++i) levels[i] = static_cast<int8_t>((pg[i] - 1) / 2);
  return best;
}

// Order of the group's values (n), ascending: ggml sorts (value, index) pairs with glibc's qsort, a
// merge sort for these sizes, so equal values keep index order as with a stable sort.
void sort_by_value(const float* xb, int n, int* idx /* (n) */) {
  std::iota(idx, idx + n, 0);
  std::stable_sort(idx, idx + n, [xb](int a, int b) { return xb[a] < xb[b]; });
}

// Levels 0/1/2 from the two split points of the sorted order (L: n).
void levels_from_split(const int* idx, int n, int i1, int i2, int8_t* L) {
  for (int j = 0; j < n; ++j) L[idx[j]] = static_cast<int8_t>(j < i1 ? 0 : j < i2 ? 1 : 2);
}

void quantize_iq1_s(const float* x /* (n) */, const float* qw /* (n) */, uint8_t* y, int64_t n) {
  constexpr float kGroupMaxEps = 1e-12f;  // ggml's GROUP_MAX_EPS_IQ1_S
  constexpr int kBs = 32;
  const GridSearch& gs = iq1s_search();
  float scales[kQK / kBs];
  int8_t shifts[kQK / kBs];
  float weight[kBs], sumx[kBs + 1], sumw[kBs + 1];
  int idx[kBs];
  int8_t L[kBs];
  int index[kBs / 8];
  for (int64_t b = 0; b < n / kQK; ++b, x += kQK, qw += kQK, y += kIQ1_SBytes) {
    std::memset(y, 0, kIQ1_SBytes);
    float max_scale = 0;
    const float sigma2 = super_block_sigma2(x);
    for (int ib = 0; ib < kQK / kBs; ++ib) {
      const float* xb = x + kBs * ib;
      importance_weights(xb, qw + kBs * ib, sigma2, kBs, weight);
      scales[ib] = 0;
      shifts[ib] = 1;
      float max = std::fabs(xb[0]);
      for (int i = 1; i < kBs; ++i) max = ggml_max(max, std::fabs(xb[i]));
      if (max < kGroupMaxEps) continue;
      // With three levels the weighted least-squares fit can be searched exhaustively: in value order,
      // every split into (low, middle, high) for either shift, scored from prefix sums.
      sort_by_value(xb, kBs, idx);
      sumx[0] = sumw[0] = 0;
      for (int j = 0; j < kBs; ++j) {
        const int i = idx[j];
        sumx[j + 1] = sumx[j] + weight[i] * xb[i];
        sumw[j + 1] = sumw[j] + weight[i];
      }
      float best_score = -FLT_MAX, scale = max;
      int besti1 = -1, besti2 = -1, best_shift = 0;
      for (int i1 = 0; i1 <= kBs; ++i1) {
        for (int i2 = i1; i2 <= kBs; ++i2) {
          for (const int shift : {1, -1}) {
            const float* xs = shift == 1 ? kIq1Plus : kIq1Minus;
            const float sumqx = (sumx[i1] - sumx[0]) * xs[0] + (sumx[i2] - sumx[i1]) * xs[1] +
                                (sumx[kBs] - sumx[i2]) * xs[2];
            const float sumq2 = (sumw[i1] - sumw[0]) * xs[0] * xs[0] + (sumw[i2] - sumw[i1]) * xs[1] * xs[1] +
                                (sumw[kBs] - sumw[i2]) * xs[2] * xs[2];
            if (sumq2 > 0 && sumqx * sumqx > best_score * sumq2) {
              scale = sumqx / sumq2;
              best_score = scale * sumqx;
              besti1 = i1;
              besti2 = i2;
              best_shift = shift;
            }
          }
        }
      }
      if (besti1 < 0 || besti2 < 0 || best_shift == 0) continue;
      levels_from_split(idx, kBs, besti1, besti2, L);
      if (scale < 0) {
        for (int j = 0; j < kBs; ++j) L[j] = static_cast<int8_t>(2 - L[j]);
        scale = -scale;
        best_shift = -best_shift;
      }
      const float* xs = best_shift == 1 ? kIq1Plus : kIq1Minus;
      bool all_on_grid = true;
      for (int k = 0; k < kBs / 8; ++k) {
        index[k] = gs.index(L + 8 * k);
        if (index[k] < 0) {
          all_on_grid = false;
          index[k] = iq1_snap_to_neighbour(gs, L + 8 * k, xb + 8 * k, weight + 8 * k, scale, xs);
        }
      }
      if (!all_on_grid) {
        float sumqx = 0, sumq2 = 0;
        for (int k = 0; k < kBs / 8; ++k) {
          const int8_t* pg = gs.point(index[k]);
          for (int j = 0; j < 8; ++j) {
            const float w = weight[8 * k + j];
            const float q = xs[(pg[j] - 1) / 2];
            sumqx += w * q * xb[8 * k + j];
            sumq2 += w * q * q;
          }
        }
        if (sumqx > 0 && sumq2 > 0) scale = sumqx / sumq2;
      }
      unsigned h = 0;
      for (int k = 0; k < kBs / 8; ++k) {
        y[kIQ1_SQs + (kBs / 8) * ib + k] = static_cast<uint8_t>(index[k] & 255);
        h |= static_cast<unsigned>(index[k] >> 8) << (3 * k);
      }
      store_u16(y + kIQ1_SQh + 2 * ib, static_cast<uint16_t>(h));
      scales[ib] = scale;
      shifts[ib] = static_cast<int8_t>(best_shift);
      max_scale = ggml_max(max_scale, scale);
    }
    if (!max_scale) continue;
    const float d = max_scale / 15;
    store_u16(y, fp32_to_fp16(d * 1.125f));  // ggml's fudge factor
    const float id = 1 / d;
    for (int ib = 0; ib < kQK / kBs; ++ib) {
      int l = std::clamp(nearest_int(0.5f * (id * scales[ib] - 1)), 0, 7);
      if (shifts[ib] == -1) l |= 8;
      uint8_t* qh = y + kIQ1_SQh + 2 * ib;
      store_u16(qh, static_cast<uint16_t>(load_u16(qh) | (l << 12)));
    }
  }
}

void quantize_iq1_m(const float* x /* (n) */, const float* qw /* (n) */, uint8_t* y, int64_t n) {
  constexpr float kGroupMaxEps = 1e-7f;  // ggml's GROUP_MAX_EPS_IQ1_M
  constexpr int kBs = 16;
  const GridSearch& gs = iq1s_search();
  // The shift pattern k of a group of 16: bit 1 the sign of the first 8 values' shift, bit 0 the second's
  // (0: +,+  1: +,-  2: -,+  3: -,-), and its qh bits (3 for the first index, 7 for the second).
  const float* const first_half[4] = {kIq1Plus, kIq1Plus, kIq1Minus, kIq1Minus};
  const float* const second_half[4] = {kIq1Plus, kIq1Minus, kIq1Plus, kIq1Minus};
  constexpr uint8_t kMasks[4] = {0x00, 0x80, 0x08, 0x88};
  float scales[kQK / kBs];
  int8_t shifts[kQK / kBs];
  float weight[kBs];
  int idx[kBs];
  int8_t L[kBs];
  int index[kBs / 8];
  for (int64_t b = 0; b < n / kQK; ++b, x += kQK, qw += kQK, y += kIQ1_MBytes) {
    std::memset(y, 0, kIQ1_MBytes);
    float max_scale = 0;
    const float sigma2 = super_block_sigma2(x);
    for (int ib = 0; ib < kQK / kBs; ++ib) {
      const float* xb = x + kBs * ib;
      importance_weights(xb, qw + kBs * ib, sigma2, kBs, weight);
      scales[ib] = 0;
      shifts[ib] = 0;
      float max = std::fabs(xb[0]);
      for (int i = 1; i < kBs; ++i) max = ggml_max(max, std::fabs(xb[i]));
      if (max < kGroupMaxEps) continue;
      // Exhaustive split search as IQ1_S, for the four shift patterns at once; ggml accumulates each
      // split's sums element by element in value order (no prefix sums), and so do we.
      sort_by_value(xb, kBs, idx);
      float best_score = -FLT_MAX, scale = max;
      int besti1 = -1, besti2 = -1, best_k = -1;
      for (int i1 = 0; i1 <= kBs; ++i1) {
        for (int i2 = i1; i2 <= kBs; ++i2) {
          float sumqx[4] = {}, sumq2[4] = {};
          for (int j = 0; j < kBs; ++j) {
            const int i = idx[j];
            const int level = j < i1 ? 0 : j < i2 ? 1 : 2;
            for (int k = 0; k < 4; ++k) {
              const float q = (i < kBs / 2 ? first_half[k] : second_half[k])[level];
              sumqx[k] += weight[i] * q * xb[i];
              sumq2[k] += weight[i] * q * q;
            }
          }
          for (int k = 0; k < 4; ++k) {
            if (sumq2[k] > 0 && sumqx[k] * sumqx[k] > best_score * sumq2[k]) {
              scale = sumqx[k] / sumq2[k];
              best_score = scale * sumqx[k];
              besti1 = i1;
              besti2 = i2;
              best_k = k;
            }
          }
        }
      }
      if (besti1 < 0 || besti2 < 0 || best_k < 0) continue;
      levels_from_split(idx, kBs, besti1, besti2, L);
      if (scale < 0) {
        for (int j = 0; j < kBs; ++j) L[j] = static_cast<int8_t>(2 - L[j]);
        scale = -scale;
        best_k = 3 - best_k;  // both shifts flip
      }
      bool all_on_grid = true;
      for (int k = 0; k < kBs / 8; ++k) {
        const float* xs = k == 0 ? first_half[best_k] : second_half[best_k];
        index[k] = gs.index(L + 8 * k);
        if (index[k] < 0) {
          all_on_grid = false;
          index[k] = iq1_snap_to_neighbour(gs, L + 8 * k, xb + 8 * k, weight + 8 * k, scale, xs);
        }
      }
      if (!all_on_grid) {
        float sumqx = 0, sumq2 = 0;
        for (int k = 0; k < kBs / 8; ++k) {
          const float* xs = k == 0 ? first_half[best_k] : second_half[best_k];
          const int8_t* pg = gs.point(index[k]);
          for (int j = 0; j < 8; ++j) {
            const float w = weight[8 * k + j];
            const float q = xs[(pg[j] - 1) / 2];
            sumqx += w * q * xb[8 * k + j];
            sumq2 += w * q * q;
          }
        }
        if (sumqx > 0 && sumq2 > 0) scale = sumqx / sumq2;
      }
      y[kIQ1_MQs + 2 * ib] = static_cast<uint8_t>(index[0] & 255);
      y[kIQ1_MQs + 2 * ib + 1] = static_cast<uint8_t>(index[1] & 255);
      y[kIQ1_MQh + ib] = static_cast<uint8_t>((index[0] >> 8) | ((index[1] >> 8) << 4));
      scales[ib] = scale;
      shifts[ib] = static_cast<int8_t>(best_k);
      max_scale = ggml_max(max_scale, scale);
    }
    if (!max_scale) continue;
    // The 3-bit group scales from max_scale, then the super-block scale refitted by least squares over the
    // whole super-block as stored (groups skipped above included, at grid point 0 and scale level 0).
    uint16_t sc[4] = {};
    float d = max_scale / 15;
    const float id = 1 / d;
    float sumqx = 0, sumq2 = 0;
    for (int ib = 0; ib < kQK / kBs; ++ib) {
      const int l = std::clamp(nearest_int(0.5f * (id * scales[ib] - 1)), 0, 7);
      sc[ib / 4] = static_cast<uint16_t>(sc[ib / 4] | (l << (3 * (ib % 4))));
      y[kIQ1_MQh + ib] |= kMasks[shifts[ib]];
      const uint8_t qh = y[kIQ1_MQh + ib];  // the shift bits are masked off below
      const float* xb = x + kBs * ib;
      importance_weights(xb, qw + kBs * ib, sigma2, kBs, weight);
      for (int k = 0; k < kBs / 8; ++k) {
        const float* xs = k == 0 ? first_half[shifts[ib]] : second_half[shifts[ib]];
        const int8_t* pg = gs.point(y[kIQ1_MQs + 2 * ib + k] + ((qh << (8 - 4 * k)) & 0x700));
        for (int j = 0; j < 8; ++j) {
          const float w = weight[8 * k + j];
          const float q = xs[(pg[j] - 1) / 2] * (2 * l + 1);
          sumqx += w * q * xb[8 * k + j];
          sumq2 += w * q * q;
        }
      }
    }
    if (sumq2 > 0) d = sumqx / sumq2;
    const uint16_t d16 = fp32_to_fp16(d * 1.1125f);  // ggml's fudge factor
    sc[0] = static_cast<uint16_t>(sc[0] | ((d16 & 0x000f) << 12));
    sc[1] = static_cast<uint16_t>(sc[1] | ((d16 & 0x00f0) << 8));
    sc[2] = static_cast<uint16_t>(sc[2] | ((d16 & 0x0f00) << 4));
    sc[3] = static_cast<uint16_t>(sc[3] | (d16 & 0xf000));
    for (int i = 0; i < 4; ++i) store_u16(y + kIQ1_MScales + 2 * i, sc[i]);
  }
}

}  // namespace

bool dequantize_iq(GgmlType type, const uint8_t* x, float* y, int64_t n) {
  switch (type) {
    case GgmlType::IQ2_XXS: dequantize_iq2_xxs(x, y, n); return true;
    case GgmlType::IQ2_XS: dequantize_iq2_xs(x, y, n); return true;
    case GgmlType::IQ2_S: dequantize_iq2_s(x, y, n); return true;
    case GgmlType::IQ3_XXS: dequantize_iq3_xxs(x, y, n); return true;
    case GgmlType::IQ3_S: dequantize_iq3_s(x, y, n); return true;
    case GgmlType::IQ1_S: dequantize_iq1_s(x, y, n); return true;
    case GgmlType::IQ1_M: dequantize_iq1_m(x, y, n); return true;
    default: return false;
  }
}

bool quantize_iq(GgmlType type, const float* x, uint8_t* y, int64_t n) {
  switch (type) {
    case GgmlType::IQ3_XXS: quantize_iq3_xxs(x, nullptr, y, n); return true;
    case GgmlType::IQ3_S: quantize_iq3_s(x, nullptr, y, n); return true;
    case GgmlType::IQ2_S: quantize_iq2_s(x, nullptr, y, n); return true;
    default: return false;  // IQ2_XXS, IQ2_XS, IQ1_S, IQ1_M need an importance matrix
  }
}

bool quantize_iq_imatrix(GgmlType type, const float* x, uint8_t* y, int64_t n, const float* imatrix) {
  switch (type) {
    case GgmlType::IQ2_XXS: quantize_iq2_xxs(x, imatrix, y, n); return true;
    case GgmlType::IQ2_XS: quantize_iq2_xs(x, imatrix, y, n); return true;
    case GgmlType::IQ1_S: quantize_iq1_s(x, imatrix, y, n); return true;
    case GgmlType::IQ1_M: quantize_iq1_m(x, imatrix, y, n); return true;
    case GgmlType::IQ3_XXS: quantize_iq3_xxs(x, imatrix, y, n); return true;
    case GgmlType::IQ3_S: quantize_iq3_s(x, imatrix, y, n); return true;
    case GgmlType::IQ2_S: quantize_iq2_s(x, imatrix, y, n); return true;
    default: return false;
  }
}

}  // namespace shardlm::quant_detail
