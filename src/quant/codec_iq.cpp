// IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M (see codecs.h). The dequantizers are ggml's
// dequantize_row_iq*; the quantizers are the three that ggml runs without an importance matrix
// (quantize_row_iq3_xxs_ref, quantize_row_iq3_s_ref, quantize_row_iq2_s_ref), followed operation by
// operation as in quant_ref.cpp, because byte-identical output is the point. Layouts: quant/blocks_iq.h.
#include <algorithm>
#include <array>
#include <bit>
#include <cfloat>
#include <cmath>
#include <cstring>
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

// ggml's nearest_int: round half to even through the float adder; valid for |v| <= 2^22 (out-of-range
// values only reach clamped levels).
int nearest_int(float v) {
  const float t = v + 12582912.f;
  return static_cast<int>(std::bit_cast<uint32_t>(t) & 0x007fffffu) - 0x00400000;
}

uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

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

// Built on first use (the IQ2_S one takes a few tens of milliseconds); C++ makes the initialisation of a
// function-local static thread-safe.
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
// Returns the scale; L (n) gets the levels, each point of them on the grid.
float fit_group(const GridSearch& gs, const FitParams& p, const float* xval, const float* weight,
                const float* waux, float max, int8_t* L) {
  const int dim = gs.dim();
  const int npoints = p.n / dim;
  int8_t laux[32];
  bool on_grid[8], on_grid_aux[8];
  std::fill(L, L + p.n, int8_t{0});
  float best = 0;
  float scale = max / (2 * p.kmax_q - 1);
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
  if (any_off && scale > 0) {
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

// 2 * mean(x^2) over the super-block: IQ2_S's weights get a quarter of it as a floor.
float super_block_sigma2(const float* x /* (kQK) */) {
  float sumx2 = 0;
  for (int i = 0; i < kQK; ++i) sumx2 += x[i] * x[i];
  return 2 * sumx2 / kQK;
}

// ---------------------------------------------------------------------------------------------------
// Quantization.

void quantize_iq3_xxs(const float* x /* (n) */, uint8_t* y, int64_t n) {
  constexpr float kGroupMaxEps = 1e-8f;  // ggml's GROUP_MAX_EPS_IQ3_XXS
  const GridSearch& gs = iq3xxs_search();
  const FitParams fp{
      .n = 32, .kmax_q = 8, .steps = 15, .step = 0.2f, .assume_on_grid = true, .refit_all = false};
  float scales[kQK / 32];
  float weight[32], waux[32], xval[32];
  int8_t L[32];
  for (int64_t b = 0; b < n / kQK; ++b, x += kQK, y += kIQ3_XXSBytes) {
    std::memset(y, 0, kIQ3_XXSBytes);
    float max_scale = 0;
    for (int ib = 0; ib < kQK / 32; ++ib) {
      const float* xb = x + 32 * ib;
      for (int i = 0; i < 32; ++i) weight[i] = xb[i] * xb[i];
      for (int i = 0; i < 32; ++i) waux[i] = std::sqrt(weight[i]);
      // Signs are stored as 7-bit indices into the even-parity sign bytes: with an odd number of
      // negatives, the value that costs least to get wrong keeps the wrong sign (a negative magnitude).
      uint8_t block_signs[4];
      for (int k = 0; k < 4; ++k) {
        int nflip = 0;
        uint8_t s = 0;
        for (int i = 0; i < 8; ++i) {
          if (xb[8 * k + i] >= 0) {
            xval[8 * k + i] = xb[8 * k + i];
          } else {
            xval[8 * k + i] = -xb[8 * k + i];
            ++nflip;
            s |= static_cast<uint8_t>(1 << i);
          }
        }
        if (nflip % 2) {
          int imin = 0;
          float min = weight[8 * k] * xb[8 * k] * xb[8 * k];
          for (int i = 1; i < 8; ++i) {
            const float ax = weight[8 * k + i] * xb[8 * k + i] * xb[8 * k + i];
            if (ax < min) {
              min = ax;
              imin = i;
            }
          }
          xval[8 * k + imin] = -xval[8 * k + imin];
          s ^= static_cast<uint8_t>(1 << imin);
        }
        block_signs[k] = s & 127;
      }
      float max = xval[0];
      for (int i = 1; i < 32; ++i) max = ggml_max(max, xval[i]);
      if (max < kGroupMaxEps) {
        scales[ib] = 0;  // indices and signs stay 0
        continue;
      }
      float scale = fit_group(gs, fp, xval, weight, waux, max, L);
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

void quantize_iq3_s(const float* x /* (n) */, uint8_t* y, int64_t n) {
  const GridSearch& gs = iq3s_search();
  const FitParams fp{
      .n = 32, .kmax_q = 8, .steps = 9, .step = 0.2f, .assume_on_grid = false, .refit_all = true};
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
    for (int ib = 0; ib < kQK / 32; ++ib) {
      const float* xb = x + 32 * ib;
      for (int i = 0; i < 32; ++i) weight[i] = xb[i] * xb[i];
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
      float scale = fit_group(gs, fp, xval, weight, waux, max, L);
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

void quantize_iq2_s(const float* x /* (n) */, uint8_t* y, int64_t n) {
  constexpr float kGroupMaxEps = 1e-8f;  // ggml's GROUP_MAX_EPS_IQ2_S
  const GridSearch& gs = iq2s_search();
  const FitParams fp{
      .n = 16, .kmax_q = 3, .steps = 9, .step = 0.1f, .assume_on_grid = true, .refit_all = false};
  float scales[kQK / 16];
  float weight[16], waux[16], xval[16];
  int8_t L[16];
  for (int64_t b = 0; b < n / kQK; ++b, x += kQK, y += kIQ2_SBytes) {
    std::memset(y, 0, kIQ2_SBytes);
    float max_scale = 0;
    const float sigma2 = super_block_sigma2(x);
    for (int ib = 0; ib < kQK / 16; ++ib) {
      const float* xb = x + 16 * ib;
      // Without an importance matrix ggml weighs by x^2 plus a floor from the super-block's spread.
      for (int i = 0; i < 16; ++i) weight[i] = 0.25f * sigma2 + xb[i] * xb[i];
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
      float scale = fit_group(gs, fp, xval, weight, waux, max, L);
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
    case GgmlType::IQ3_XXS: quantize_iq3_xxs(x, y, n); return true;
    case GgmlType::IQ3_S: quantize_iq3_s(x, y, n); return true;
    case GgmlType::IQ2_S: quantize_iq2_s(x, y, n); return true;
    default: return false;  // IQ2_XXS, IQ2_XS, IQ1_S, IQ1_M need an importance matrix
  }
}

bool quantize_iq_imatrix(GgmlType, const float*, uint8_t*, int64_t, const float*) { return false; }

}  // namespace shardlm::quant_detail
