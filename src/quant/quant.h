// Block formats of the weight types, byte-identical to ggml's, and the CPU row kernels on them.
//
// A "row" is ne[0] elements of one type, stored contiguously (n must be a multiple of the block size).
#pragma once

#include <cstddef>
#include <cstdint>

#include "core/dtype.h"

namespace shardlm {

// fp16/bf16 scalar conversions (round to nearest even), usable from every layer.
uint16_t fp32_to_fp16(float f);
float fp16_to_fp32(uint16_t h);
uint16_t fp32_to_bf16(float f);
float bf16_to_fp32(uint16_t h);

// Quantizes `n` floats into `dst` (row_bytes(type, n) bytes), with ggml's reference rounding so that
// files we write match what llama.cpp's quantizer would produce in layout (values may differ only where
// ggml uses an importance matrix; we do not).
void quantize_row(GgmlType type, const float* src /* (n) */, void* dst, int64_t n);
// The same with an importance matrix (llama-quantize's --imatrix): imatrix (n) weighs each column's error,
// the bytes are ggml's quantize_<type> with those weights. Every compute type but F32/F16/BF16.
void quantize_row_imatrix(GgmlType type, const float* src /* (n) */, void* dst, int64_t n,
                          const float* imatrix /* (n) */);
void dequantize_row(GgmlType type, const void* src, float* dst /* (n) */, int64_t n);
// n_rows rows of n elements, `stride` bytes apart from src, into dst rows ldd floats apart (checked once: the CPU
// attention converts a cache block's rows of one head with one call).
void dequantize_rows(GgmlType type, const void* src, size_t stride, int64_t n_rows, int64_t n,
                     float* dst /* (n_rows, ldd) */, int64_t ldd);

// Whether quantize_row can write `type` (every compute type except the IQ types that need an importance
// matrix), so that callers refuse before any work.
bool can_quantize(GgmlType type);

// Dot product of one weight row (`type`, n elements) with an fp32 vector. Dequantizes in registers (or
// rounds the activations to int8: quantizes_activations); SIMD (AVX2/AVX-512) selected at run time,
// portable fallback otherwise.
float dot_row(GgmlType type, const void* row, const float* x /* (n) */, int64_t n);

// y[r] = dot(row r of w, x) for r in [0, n_rows). `w` holds n_rows rows of n_cols elements, each
// `row_stride` bytes apart. Single-threaded: callers split rows across threads.
void matvec_rows(GgmlType type, const void* w, size_t row_stride, int64_t n_rows, int64_t n_cols,
                 const float* x /* (n_cols) */, float* y /* (n_rows) */);

// Multi-token variant used by prefill: for each of n_rows rows and n_tok tokens,
// y[t*ldy + r] = dot(row r, x + t*ldx). Blocks rows so a weight row is read once for all tokens.
void matmul_rows(GgmlType type, const void* w, size_t row_stride, int64_t n_rows, int64_t n_cols,
                 const float* x /* (n_tok, ldx) */, int64_t ldx, int64_t n_tok,
                 float* y /* (n_tok, ldy) */, int64_t ldy);

// Name of the kernel family picked at run time ("avx512", "avx2", "scalar"), for bench output.
const char* cpu_kernel_isa();

// Kernel families. The default is the best one this CPU supports, unless the environment variable
// SHARDLM_CPU_ISA=scalar|avx2|avx512 forces one (read once, at the first kernel call; an unknown or
// unsupported value throws Error from that call). Tests and benches use the explicit-ISA overloads
// below, so every path is covered on one machine without touching the environment.
enum class CpuIsa { kScalar, kAvx2, kAvx512 };

const char* cpu_isa_name(CpuIsa isa);
bool cpu_isa_supported(CpuIsa isa);  // avx2 needs AVX2+FMA+F16C; avx512 needs AVX-512 F+BW+VL
// Parses "scalar", "avx2", "avx512"; throws Error on an unknown name or an ISA this CPU lacks.
CpuIsa parse_cpu_isa(const char* name);
CpuIsa cpu_isa();  // the default family (environment override or best supported)

// Whether family `isa`'s kernels for `type` round the activations to int8, as llama.cpp's CPU kernels do:
// Q8_0, Q4_0, Q4_K and Q6_K on avx2 and avx512 (both run the avx2 integer kernels). Each token's row is
// rounded once per call by quantize_activation_q8, and each 32-element block's dot is an exact integer sum
// times the two scales, so
// the result is within sum over blocks of sum|w| * d / 2 of the exact dot (d the block's activation scale),
// and it does not depend on the other tokens of the call (batch invariance). Other types and the scalar
// family multiply the fp32 activations.
bool quantizes_activations(CpuIsa isa, GgmlType type);
// The rounding of those kernels, bit for bit: per block of 32 (n a multiple of 32), d = max|x| / 127 and
// q = x * (1 / d) rounded to the nearest integer, ties to even (0 where d is 0).
void quantize_activation_q8(const float* x /* (n) */, int64_t n, int8_t* q /* (n) */, float* d /* (n / 32) */);

// Packed rows: where packs_rows(isa, type) is true, family `isa` multiplies a matrix of `type` faster after
// pack_rows has rearranged it (Q8_0, Q4_0, Q4_K and Q6_K on avx2 and avx512: the blocks of 8 rows
// interleaved, so that one load feeds all 8 rows' dot products). A backend packs a matrix once, at load, and
// multiplies it with matmul_packed_rows only. The result is within the same bound as matmul_rows' and does not
// depend on the other tokens.
inline constexpr int kPackRows = 8;  // rows per packed group; the last n_rows % kPackRows rows stay as they are
bool packs_rows(CpuIsa isa, GgmlType type);
// n_rows rows of n_cols elements (src rows row_stride bytes apart) -> dst, row_bytes(type, n_cols) * n_rows
// bytes. Throws on a type packs_rows is false for in every family, or on bad sizes.
void pack_rows(GgmlType type, const void* src, size_t row_stride, int64_t n_rows, int64_t n_cols, void* dst);
// matmul_rows on packed rows: w is pack_rows' output from a row that is a multiple of kPackRows on, rows
// row_bytes(type, n_cols) apart, and n_rows reaches either a multiple of kPackRows or the matrix's end.
void matmul_packed_rows(CpuIsa isa, GgmlType type, const void* w, int64_t n_rows, int64_t n_cols,
                        const float* x /* (n_tok, ldx) */, int64_t ldx, int64_t n_tok, float* y /* (n_tok, ldy) */,
                        int64_t ldy);
void matmul_packed_rows(GgmlType type, const void* w, int64_t n_rows, int64_t n_cols,
                        const float* x /* (n_tok, ldx) */, int64_t ldx, int64_t n_tok, float* y /* (n_tok, ldy) */,
                        int64_t ldy);

// One chunk of positions of attention's online softmax (flash attention's update) for n_q query rows:
//   s (n_q, lds): the chunk's scores q . k, unscaled; row r's first n_valid[r] entries are its positions (a row with
//     none is left alone). They are overwritten with the weights exp(scale * s - m').
//   v (c, ldv): the chunk's V rows, hd floats each.
//   m, l (n_q): each row's running maximum of scale * s (-inf before its first chunk) and running sum of weights;
//   acc (n_q, hd): its running weighted sum of V rows. When a row's maximum grows to m', l and acc are first scaled
//     by exp(m - m'); the attention output is acc / l after the last chunk.
// Each row depends only on its own scores, the V rows and n_valid[r]: a query's result does not depend on the
// other rows of the call, as long as its positions are cut into the same chunks. The SIMD families' exp is a
// polynomial within about 2 ulp of the exact one.
void attend_chunk(CpuIsa isa, float* s, int64_t lds, const int32_t* n_valid /* (n_q) */, int64_t n_q, const float* v,
                  int64_t ldv, int64_t hd, float scale, float* m, float* l, float* acc);

float dot_row(CpuIsa isa, GgmlType type, const void* row, const float* x /* (n) */, int64_t n);
void matvec_rows(CpuIsa isa, GgmlType type, const void* w, size_t row_stride, int64_t n_rows,
                 int64_t n_cols, const float* x /* (n_cols) */, float* y /* (n_rows) */);
void matmul_rows(CpuIsa isa, GgmlType type, const void* w, size_t row_stride, int64_t n_rows,
                 int64_t n_cols, const float* x /* (n_tok, ldx) */, int64_t ldx, int64_t n_tok,
                 float* y /* (n_tok, ldy) */, int64_t ldy);

}  // namespace shardlm
