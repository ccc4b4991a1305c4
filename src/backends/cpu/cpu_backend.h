#pragma once

#include <memory>

#include "ops/backend.h"

namespace shardlm {

// Multithreaded host backend: quantized dot kernels from src/quant (SIMD chosen at run time), work split
// over `n_threads` (0 = all cores). KV cache type F32 or F16.
std::unique_ptr<Backend> make_cpu_backend(int n_threads);

// Cores the OS gives this process (sched_getaffinity), at least 1.
int cpu_core_count();

}  // namespace shardlm
