// Public kernel entry points: validate every argument once, pick the ISA, hand off to one kernel family.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdlib>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#include <string_view>
#include <vector>

#include "core/error.h"
#include "quant/blocks.h"
#include "quant/kernels.h"
#include "quant/quant.h"

namespace shardlm {

// Declared in kernels_tile.h (the prefill path's decoded rows); compiled here, for the baseline ISA.
namespace quant_detail {
float* decode_scratch(size_t n) {
  thread_local std::vector<float> buf;  // grows to the largest request; reused across calls
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}
}  // namespace quant_detail

using namespace quant_detail;

namespace {

// Every compute type has a reference codec and a register decoder in each SIMD family
// (kernels_tile.h's matmul_dispatch; test_quant_kernels covers each type on each family).
bool has_kernels(GgmlType t) { return type_traits(t).compute; }

MatmulFn kernel_for(CpuIsa isa) {
  if (!cpu_isa_supported(isa))
    fail_kind(ErrorKind::kUnsupported, "CPU kernel family '", cpu_isa_name(isa),
              "' is not supported by this CPU");
  switch (isa) {
    case CpuIsa::kAvx512: return matmul_avx512;
    case CpuIsa::kAvx2: return matmul_avx2;
    case CpuIsa::kScalar: return matmul_scalar;
  }
  SHARDLM_CHECK(false, "unknown CpuIsa ", static_cast<int>(isa));
}

CpuIsa detect_cpu_isa() {
  const char* env = std::getenv("SHARDLM_CPU_ISA");
  if (env != nullptr && *env != '\0') return parse_cpu_isa(env);
  if (cpu_isa_supported(CpuIsa::kAvx512)) return CpuIsa::kAvx512;
  if (cpu_isa_supported(CpuIsa::kAvx2)) return CpuIsa::kAvx2;
  return CpuIsa::kScalar;
}

void check_matmul_args(GgmlType type, const void* w, size_t row_stride, int64_t n_rows, int64_t n_cols,
                       const float* x, int64_t ldx, int64_t n_tok, const float* y, int64_t ldy) {
  if (!has_kernels(type))
    fail_kind(ErrorKind::kUnsupported, "weight type ", type_name(type), " has no CPU dot kernel");
  const int64_t rb = row_bytes(type, n_cols);  // throws on n_cols < 0 or not a block multiple
  if (n_rows < 0) fail("n_rows ", n_rows, " is negative");
  if (n_tok < 0) fail("n_tok ", n_tok, " is negative");
  if (n_rows == 0 || n_tok == 0) return;
  if (n_rows > 1 && row_stride < static_cast<uint64_t>(rb))
    fail("row_stride ", row_stride, " is smaller than one ", type_name(type), " row of ", n_cols,
         " elements (", rb, " bytes)");
  if (n_tok > 1 && ldx < n_cols) fail("ldx ", ldx, " is smaller than n_cols ", n_cols);
  if (n_tok > 1 && ldy < n_rows) fail("ldy ", ldy, " is smaller than n_rows ", n_rows);
  if (y == nullptr) fail("output y is null for ", n_tok, " x ", n_rows, " results");
  if (n_cols > 0 && (w == nullptr || x == nullptr))
    fail(w == nullptr ? "weights w" : "activations x", " is null for rows of ", n_cols, " elements");
}

}  // namespace

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kScalar: return "scalar";
    case CpuIsa::kAvx2: return "avx2";
    case CpuIsa::kAvx512: return "avx512";
  }
  return "unknown";
}

#if defined(__x86_64__) || defined(__i386__)
namespace {
// F16C from CPUID leaf 1 (ECX bit 29): clang's __builtin_cpu_supports does not know "f16c". Asked once:
// every kernel call checks its family, and CPUID traps to the hypervisor in a VM (microseconds a call).
bool cpu_has_f16c() {
  static const bool has = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C) != 0;
  }();
  return has;
}
}  // namespace
#endif

bool cpu_isa_supported(CpuIsa isa) {
#if defined(__x86_64__) || defined(__i386__)
  switch (isa) {
    case CpuIsa::kScalar: return true;
    case CpuIsa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c();
    case CpuIsa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") && cpu_has_f16c();
  }
  return false;
#else
  return isa == CpuIsa::kScalar;
#endif
}

CpuIsa parse_cpu_isa(const char* name) {
  if (name == nullptr) fail("SHARDLM_CPU_ISA: name is null (expected scalar, avx2 or avx512)");
  const std::string_view s(name);
  CpuIsa isa;
  if (s == "scalar") isa = CpuIsa::kScalar;
  else if (s == "avx2") isa = CpuIsa::kAvx2;
  else if (s == "avx512") isa = CpuIsa::kAvx512;
  else fail("SHARDLM_CPU_ISA: unknown value '", s, "' (expected scalar, avx2 or avx512)");
  if (!cpu_isa_supported(isa))
    fail_kind(ErrorKind::kUnsupported, "SHARDLM_CPU_ISA: '", s, "' is not supported by this CPU");
  return isa;
}

CpuIsa cpu_isa() {
  // Immutable after the first successful call; a throwing initialization is retried on the next call.
  static const CpuIsa isa = detect_cpu_isa();
  return isa;
}

namespace {
// Whether the avx512 family's packed integer groups take the VNNI kernels (kernels_vnni.cpp: the same bits).
bool cpu_has_avx512_vnni() {
#if defined(__x86_64__)
  static const bool has = cpu_isa_supported(CpuIsa::kAvx512) && __builtin_cpu_supports("avx512vnni");  // every matmul
  return has;
#else
  return false;
#endif
}
}  // namespace

const char* cpu_kernel_isa() {
  if (cpu_isa() == CpuIsa::kAvx512 && cpu_has_avx512_vnni()) return "avx512+vnni";
  return cpu_isa_name(cpu_isa());
}

bool quantizes_activations(CpuIsa isa, GgmlType type) {
  // avx2: its float path spends ~16 instructions per 32 weights and token, the integer one ~8 (docs/BENCHMARKS.md,
  // "integer dot products for decode"). The avx512 family takes the same avx2 integer kernels: its 16-wide float
  // kernels decoded slower than them on the H100 machine's 16-core Xeon (docs/BENCHMARKS.md, "Packed rows").
  if (isa != CpuIsa::kAvx2 && isa != CpuIsa::kAvx512) return false;
  switch (type) {
    case GgmlType::Q8_0:
    case GgmlType::Q4_0:
    case GgmlType::Q4_K:
    case GgmlType::Q6_K: return true;
    default: return false;
  }
}

void quantize_activation_q8(const float* x, int64_t n, int8_t* q, float* d) {
  if (n < 0 || n % 32 != 0) fail("quantize_activation_q8: n ", n, " is not a non-negative multiple of 32");
  for (int64_t b = 0; b < n / 32; ++b) {
    float amax = 0.0f;
    for (int i = 0; i < 32; ++i) amax = std::max(amax, std::fabs(x[32 * b + i]));
    const float db = amax / 127.0f;
    const float id = db != 0.0f ? 1.0f / db : 0.0f;
    for (int i = 0; i < 32; ++i) q[32 * b + i] = static_cast<int8_t>(std::nearbyint(x[32 * b + i] * id));
    d[b] = db;
  }
}

void matmul_rows(CpuIsa isa, GgmlType type, const void* w, size_t row_stride, int64_t n_rows,
                 int64_t n_cols, const float* x, int64_t ldx, int64_t n_tok, float* y, int64_t ldy) {
  check_matmul_args(type, w, row_stride, n_rows, n_cols, x, ldx, n_tok, y, ldy);
  MatmulFn fn = kernel_for(isa);
  if (n_rows == 0 || n_tok == 0) return;
  if (quantizes_activations(isa, type)) fn = matmul_int8_avx2;
  // The SIMD families walk rows in chunks of up to 64 elements and have no tail loop; block types
  // always fill whole chunks, but plain types can have any row length (the tiny models' n_ff of 172).
  const bool plain = type == GgmlType::F32 || type == GgmlType::F16 || type == GgmlType::BF16;
  if (plain && n_cols % 64 != 0) fn = matmul_scalar;
  fn(type, static_cast<const uint8_t*>(w), row_stride, n_rows, n_cols, x, ldx, n_tok, y, ldy);
}

static_assert(kPackRows == kQ4x8Rows, "quant.h promises the packed group of blocks.h");

bool packs_rows(CpuIsa isa, GgmlType type) {
  // Every type the avx2 integer kernels take, wherever they run (docs/BENCHMARKS.md, "Packed rows"), and F16 /
  // BF16, whose packed kernels are a column-broadcast GEMM (fx8_rows in kernels_avx2.cpp).
  if (type == GgmlType::F16 || type == GgmlType::BF16) return isa == CpuIsa::kAvx2 || isa == CpuIsa::kAvx512;
  return quantizes_activations(isa, type);
}

namespace {

// Row r's 16 Q4_0-order quant bytes (element i low, i + 16 high) into a kQ4x8-ordered group block.
void interleave_q4(const uint8_t* qs /* (16) */, int r, uint8_t* group /* (128) */) {
  for (int k = 0; k < 4; ++k) std::memcpy(group + 32 * k + 4 * r, qs + 4 * k, 4);
}

// F16: column k of the 8 rows at 16k. BF16: columns 2p, 2p + 1 of row r at 32p + 4r, an odd last column as F16's.
void pack_fx8_group(GgmlType type, const uint8_t* const* rows /* (8) */, int64_t n_cols, uint8_t* out) {
  // Column order outside, rows inside: the 8 rows are read as 8 sequential streams and the group written once, in
  // order (a 1B model's F16 weights pack at memory speed).
  const int64_t paired = type == GgmlType::BF16 ? n_cols / 2 : 0;  // BF16 column pairs: 4 bytes of each row
  for (int64_t p = 0; p < paired; ++p)
    for (int r = 0; r < kQ4x8Rows; ++r) std::memcpy(out + 32 * p + 4 * r, rows[r] + 4 * p, 4);
  for (int64_t k = 2 * paired; k < n_cols; ++k)
    for (int r = 0; r < kQ4x8Rows; ++r) std::memcpy(out + kFx8ColBytes * k + 2 * r, rows[r] + 2 * k, 2);
}

void pack_q8_0_group(const uint8_t* const* rows /* (8) */, int64_t nb, uint8_t* out) {
  for (int64_t b = 0; b < nb; ++b) {
    uint8_t* blk = out + b * kQ8x8Block;
    for (int r = 0; r < kQ4x8Rows; ++r) {
      const uint8_t* src = rows[r] + b * kQ8_0Bytes;
      std::memcpy(blk + 2 * r, src, 2);
      for (int k = 0; k < 8; ++k) std::memcpy(blk + kQ8x8Qs + 32 * k + 4 * r, src + kQ8_0Qs + 4 * k, 4);
    }
  }
}

void pack_q4_0_group(const uint8_t* const* rows /* (8) */, int64_t nb, uint8_t* out) {
  for (int64_t b = 0; b < nb; ++b) {
    uint8_t* blk = out + b * kQ4x8Block;
    for (int r = 0; r < kQ4x8Rows; ++r) {
      const uint8_t* src = rows[r] + b * kQ4_0Bytes;
      std::memcpy(blk + 2 * r, src, 2);
      interleave_q4(src + kQ4_0Qs, r, blk + kQ4x8Qs);
    }
  }
}

void pack_q4_k_group(const uint8_t* const* rows /* (8) */, int64_t nb, uint8_t* out) {
  for (int64_t b = 0; b < nb; ++b) {
    uint8_t* blk = out + b * kQ4Kx8Block;
    for (int r = 0; r < kQ4x8Rows; ++r) {
      const uint8_t* src = rows[r] + b * kQ4_KBytes;
      std::memcpy(blk + 2 * r, src, 2);
      std::memcpy(blk + kQ4Kx8Dmin + 2 * r, src + kQ4_KDmin, 2);
      for (int w = 0; w < 3; ++w) std::memcpy(blk + kQ4Kx8Scales + 32 * w + 4 * r, src + kQ4_KScales + 4 * w, 4);
      for (int j = 0; j < 8; ++j) {
        // Sub-block j: nibble (j & 1) of qs[32 * (j / 2) + l] is element l.
        const uint8_t* q = src + kQ4_KQs + 32 * (j / 2);
        const int shift = 4 * (j & 1);
        uint8_t qs[16];
        for (int i = 0; i < 16; ++i)
          qs[i] = static_cast<uint8_t>(((q[i] >> shift) & 0xF) | (((q[i + 16] >> shift) & 0xF) << 4));
        interleave_q4(qs, r, blk + kQ4Kx8Qs + 128 * j);
      }
    }
  }
}

void pack_q6_k_group(const uint8_t* const* rows /* (8) */, int64_t nb, uint8_t* out) {
  for (int64_t b = 0; b < nb; ++b) {
    uint8_t* blk = out + b * kQ6Kx8Block;
    for (int r = 0; r < kQ4x8Rows; ++r) {
      const uint8_t* src = rows[r] + b * kQ6_KBytes;
      std::memcpy(blk + 2 * r, src + kQ6_KD, 2);
      for (int j = 0; j < 8; ++j) std::memcpy(blk + kQ6Kx8Scales + 16 * j + 2 * r, src + kQ6_KScales + 2 * j, 2);
      for (int j = 0; j < 8; ++j) {
        int q[32];
        for (int i = 0; i < 32; ++i) q[i] = q6k_quant(src, 32 * j + i);
        uint8_t* chunk = blk + kQ6Kx8Qs + j * kQ6Kx8Chunk;
        uint8_t lo[16];
        for (int i = 0; i < 16; ++i) lo[i] = static_cast<uint8_t>((q[i] & 0xF) | (q[i + 16] & 0xF) << 4);
        interleave_q4(lo, r, chunk);
        for (int half = 0; half < 2; ++half)
          for (int i = 0; i < 4; ++i) {
            int byte = 0;
            for (int k = 0; k < 4; ++k) byte |= (q[16 * half + 4 * k + i] >> 4) << (2 * k);
            chunk[128 + 32 * half + 4 * r + i] = static_cast<uint8_t>(byte);
          }
      }
    }
  }
}

}  // namespace

void pack_rows(GgmlType type, const void* src, size_t row_stride, int64_t n_rows, int64_t n_cols, void* dst) {
  if (type != GgmlType::Q8_0 && type != GgmlType::Q4_0 && type != GgmlType::Q4_K && type != GgmlType::Q6_K &&
      type != GgmlType::F16 && type != GgmlType::BF16)
    fail_kind(ErrorKind::kUnsupported, "pack_rows: no packed layout for ", type_name(type));
  const int64_t rb = row_bytes(type, n_cols);  // throws on a bad n_cols
  if (n_rows < 0) fail("pack_rows: n_rows ", n_rows, " is negative");
  if (n_rows > 1 && row_stride < static_cast<uint64_t>(rb))
    fail("pack_rows: row_stride ", row_stride, " is smaller than one row of ", rb, " bytes");
  if (n_rows > 0 && (src == nullptr || dst == nullptr)) fail("pack_rows: null ", src == nullptr ? "src" : "dst");
  const auto* in = static_cast<const uint8_t*>(src);
  auto* out = static_cast<uint8_t*>(dst);
  const int64_t full = n_rows / kQ4x8Rows * kQ4x8Rows;
  for (int64_t g = 0; g < full; g += kQ4x8Rows) {
    const uint8_t* rows[kQ4x8Rows];
    for (int r = 0; r < kQ4x8Rows; ++r) rows[r] = in + static_cast<size_t>(g + r) * row_stride;
    if (type == GgmlType::Q8_0) pack_q8_0_group(rows, n_cols / kQ8_0Block, out + g * rb);
    else if (type == GgmlType::Q4_0) pack_q4_0_group(rows, n_cols / kQ4_0Block, out + g * rb);
    else if (type == GgmlType::Q4_K) pack_q4_k_group(rows, n_cols / kQK, out + g * rb);
    else if (type == GgmlType::Q6_K) pack_q6_k_group(rows, n_cols / kQK, out + g * rb);
    else pack_fx8_group(type, rows, n_cols, out + g * rb);
  }
  for (int64_t r = full; r < n_rows; ++r)
    std::memcpy(out + r * rb, in + static_cast<size_t>(r) * row_stride, static_cast<size_t>(rb));
}

void matmul_packed_rows(CpuIsa isa, GgmlType type, const void* w, int64_t n_rows, int64_t n_cols, const float* x,
                        int64_t ldx, int64_t n_tok, float* y, int64_t ldy) {
  if (!packs_rows(isa, type))
    fail_kind(ErrorKind::kUnsupported, "no packed ", type_name(type), " kernel in the ", cpu_isa_name(isa),
              " family");
  const size_t rb = static_cast<size_t>(row_bytes(type, n_cols));
  check_matmul_args(type, w, rb, n_rows, n_cols, x, ldx, n_tok, y, ldy);
  kernel_for(isa);  // throws where the CPU lacks the family
  if (n_rows == 0 || n_tok == 0) return;
  const auto* wb = static_cast<const uint8_t*>(w);
  if (type == GgmlType::F16 || type == GgmlType::BF16) {
    // The groups: the avx512 family's 16-lane tiles for prefill; one token through the avx2 family's 8-lane ones
    // (the same bits), which decoded faster on the Zen 5 (docs/BENCHMARKS.md, "Decisions in the source"). The last
    // n_rows % 8 rows, in ggml's layout, take the family's unpacked kernels.
    const int64_t full = n_rows / kPackRows * kPackRows;
    if (full > 0 && isa == CpuIsa::kAvx512 && n_tok > 1)
      matmul_packed_avx512(type, wb, rb, full, n_cols, x, ldx, n_tok, y, ldy);
    else if (full > 0)
      matmul_packed_avx2(type, wb, rb, full, n_cols, x, ldx, n_tok, y, ldy);
    if (full < n_rows)
      matmul_rows(isa, type, wb + full * rb, rb, n_rows - full, n_cols, x, ldx, n_tok, y + full, ldy);
    return;
  }
  const bool vnni = isa == CpuIsa::kAvx512 && cpu_has_avx512_vnni();
  matmul_packed_avx2(type, wb, rb, n_rows, n_cols, x, ldx, n_tok, y, ldy, vnni ? packed_pairs_vnni : nullptr);
}

void matmul_packed_rows(GgmlType type, const void* w, int64_t n_rows, int64_t n_cols, const float* x, int64_t ldx,
                        int64_t n_tok, float* y, int64_t ldy) {
  matmul_packed_rows(cpu_isa(), type, w, n_rows, n_cols, x, ldx, n_tok, y, ldy);
}

void attend_chunk(CpuIsa isa, float* s, int64_t lds, const int32_t* n_valid, int64_t n_q, const float* v, int64_t ldv,
                  int64_t hd, float scale, float* m, float* l, float* acc) {
  SHARDLM_CHECK(s && n_valid && v && m && l && acc && n_q >= 0 && hd > 0 && ldv >= hd,
                "attend_chunk: bad arguments (n_q ", n_q, ", hd ", hd, ", ldv ", ldv, ")");
  for (int64_t r = 0; r < n_q; ++r)
    SHARDLM_CHECK(n_valid[r] <= lds, "attend_chunk: row ", r, " has ", n_valid[r], " positions, more than lds ", lds);
  kernel_for(isa);  // throws where the CPU lacks the family
  if (isa == CpuIsa::kAvx512) return attend_chunk_avx512(s, lds, n_valid, n_q, v, ldv, hd, scale, m, l, acc);
  if (isa == CpuIsa::kAvx2) return attend_chunk_avx2(s, lds, n_valid, n_q, v, ldv, hd, scale, m, l, acc);
  for (int64_t r = 0; r < n_q; ++r) {
    const int64_t n = n_valid[r];
    if (n <= 0) continue;
    float* sr = s + r * lds;
    float mx = m[r];
    for (int64_t j = 0; j < n; ++j) mx = std::max(mx, sr[j] *= scale);
    const float alpha = std::exp(m[r] - mx);
    float sum = 0.0f;
    for (int64_t j = 0; j < n; ++j) sum += (sr[j] = std::exp(sr[j] - mx));
    l[r] = l[r] * alpha + sum;
    m[r] = mx;
    float* ar = acc + r * hd;
    for (int64_t i = 0; i < hd; ++i) {
      float a = ar[i] * alpha;
      for (int64_t j = 0; j < n; ++j) a += sr[j] * v[j * ldv + i];
      ar[i] = a;
    }
  }
}

void matvec_rows(CpuIsa isa, GgmlType type, const void* w, size_t row_stride, int64_t n_rows,
                 int64_t n_cols, const float* x, float* y) {
  matmul_rows(isa, type, w, row_stride, n_rows, n_cols, x, n_cols, 1, y, n_rows);
}

float dot_row(CpuIsa isa, GgmlType type, const void* row, const float* x, int64_t n) {
  float y = 0.0f;
  matmul_rows(isa, type, row, 0, 1, n, x, n, 1, &y, 1);
  return y;
}

void matmul_rows(GgmlType type, const void* w, size_t row_stride, int64_t n_rows, int64_t n_cols,
                 const float* x, int64_t ldx, int64_t n_tok, float* y, int64_t ldy) {
  matmul_rows(cpu_isa(), type, w, row_stride, n_rows, n_cols, x, ldx, n_tok, y, ldy);
}

void matvec_rows(GgmlType type, const void* w, size_t row_stride, int64_t n_rows, int64_t n_cols,
                 const float* x, float* y) {
  matvec_rows(cpu_isa(), type, w, row_stride, n_rows, n_cols, x, y);
}

float dot_row(GgmlType type, const void* row, const float* x, int64_t n) {
  return dot_row(cpu_isa(), type, row, x, n);
}

}  // namespace shardlm
