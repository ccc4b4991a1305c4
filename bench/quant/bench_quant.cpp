// Single-thread matvec / matmul throughput per weight type and kernel family. Decode reads every weight
// once per token, so bytes/s of weights is the figure to compare with the machine's memory bandwidth
// (run with --benchmark_filter=memcpy to get the copy bandwidth measured in the same run).
#include <benchmark/benchmark.h>

#include <cstring>
#include <random>
#include <vector>

#include "quant/quant.h"

namespace shardlm {
namespace {

constexpr GgmlType kTypes[] = {GgmlType::F32,  GgmlType::F16,  GgmlType::BF16, GgmlType::Q8_0,
                               GgmlType::Q4_0, GgmlType::Q4_K, GgmlType::Q6_K};

struct Matrix {
  std::vector<uint8_t> bytes;  // (n_rows, row_bytes)
  size_t stride = 0;
};

Matrix make_matrix(GgmlType type, int64_t n_rows, int64_t n_cols) {
  std::mt19937 rng(42);
  std::normal_distribution<float> dist(0.0f, 0.02f);
  std::vector<float> row(static_cast<size_t>(n_cols));
  Matrix m;
  m.stride = static_cast<size_t>(row_bytes(type, n_cols));
  m.bytes.resize(m.stride * static_cast<size_t>(n_rows));
  for (int64_t r = 0; r < n_rows; ++r) {
    for (auto& f : row) f = dist(rng);
    quantize_row(type, row.data(), m.bytes.data() + static_cast<size_t>(r) * m.stride, n_cols);
  }
  return m;
}

// args: type, isa, n_tok. 4096 x 4096 like a Llama-7B attention projection.
void BM_matmul(benchmark::State& state) {
  const auto type = static_cast<GgmlType>(state.range(0));
  const auto isa = static_cast<CpuIsa>(state.range(1));
  const int64_t n_tok = state.range(2);
  if (!cpu_isa_supported(isa)) {
    state.SkipWithError("ISA not supported");
    return;
  }
  constexpr int64_t n = 4096;
  const Matrix m = make_matrix(type, n, n);
  std::vector<float> x(static_cast<size_t>(n * n_tok), 0.5f), y(static_cast<size_t>(n * n_tok));
  for (auto _ : state) {
    matmul_rows(isa, type, m.bytes.data(), m.stride, n, n, x.data(), n, n_tok, y.data(), n);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(m.bytes.size()));
  state.counters["tok/s"] =
      benchmark::Counter(static_cast<double>(state.iterations() * n_tok), benchmark::Counter::kIsRate);
  state.SetLabel(std::string(type_name(type)) + " " + cpu_isa_name(isa) + " n_tok=" +
                 std::to_string(n_tok));
}

void matmul_args(benchmark::internal::Benchmark* b) {
  for (GgmlType t : kTypes)
    for (CpuIsa isa : {CpuIsa::kScalar, CpuIsa::kAvx2, CpuIsa::kAvx512})
      for (int64_t n_tok : {1, 8})
        b->Args({static_cast<int64_t>(t), static_cast<int64_t>(isa), n_tok});
}
BENCHMARK(BM_matmul)->Apply(matmul_args)->Unit(benchmark::kMillisecond);

// The memory-bandwidth ceiling for the same single thread: copy of a buffer much larger than the caches
// (bytes counted as read + written).
void BM_memcpy(benchmark::State& state) {
  const size_t n = size_t{256} << 20;
  std::vector<uint8_t> a(n, 1), b(n, 2);
  for (auto _ : state) {
    std::memcpy(b.data(), a.data(), n);
    benchmark::ClobberMemory();
  }
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(2 * n));
}
BENCHMARK(BM_memcpy)->Unit(benchmark::kMillisecond);

// Read-only bandwidth: sum over a large buffer (what a matvec's weight stream looks like).
void BM_read(benchmark::State& state) {
  const size_t n = size_t{256} << 20;
  std::vector<uint64_t> a(n / 8, 1);
  for (auto _ : state) {
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (size_t i = 0; i + 4 <= a.size(); i += 4) s0 += a[i], s1 += a[i + 1], s2 += a[i + 2], s3 += a[i + 3];
    benchmark::DoNotOptimize(s0 + s1 + s2 + s3);
  }
  state.SetBytesProcessed(state.iterations() * static_cast<int64_t>(n));
}
BENCHMARK(BM_read)->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace shardlm

BENCHMARK_MAIN();
