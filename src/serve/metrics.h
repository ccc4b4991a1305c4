// The server's Prometheus metrics (GET /metrics, text exposition format 0.0.4), named after vLLM's with
// the "shardlm:" prefix: gauges of running and waiting requests, of the KV pool's use and of the memory
// rank 0 holds per device, token counters, and latency histograms. Thread-safe: the engine thread records,
// HTTP threads render.
#pragma once

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace shardlm::serve {

// Bytes the engine holds on one device of its rank: "cpu", "cuda0", ...
struct DeviceMemory {
  std::string device;
  double used_bytes = 0;
};

struct Histogram {
  std::vector<double> bounds;    // upper bounds, ascending; +Inf is implied
  std::vector<uint64_t> counts;  // (bounds.size() + 1) observations per bucket, not cumulative
  double sum = 0;
  uint64_t count = 0;

  explicit Histogram(std::vector<double> upper_bounds);
  void observe(double v);
};

class ServeMetrics {
 public:
  ServeMetrics();

  // Engine thread.
  void set_gauges(int64_t running, int64_t waiting, double kv_usage /* 0..1 */);
  void add_prompt_tokens(int64_t n);
  void add_generation_tokens(int64_t n);
  void observe_ttft(double s);
  void observe_itl(double s);
  void observe_e2e(double s);
  void count_finished(const std::string& reason);  // "stop", "length", "abort"
  // Prefix caching: the scheduler's running totals of prompt tokens looked up and found.
  void set_prefix_cache(int64_t query_tokens, int64_t hit_tokens);
  // The memory of rank 0's devices (none: the gauge is left out).
  void set_device_memory(std::vector<DeviceMemory> devices);

  // Any thread: the exposition text, every series labelled model_name="<model>".
  std::string render(const std::string& model) const;

 private:
  mutable std::mutex mu_;
  int64_t running_ = 0, waiting_ = 0;
  double kv_usage_ = 0;
  int64_t prompt_tokens_ = 0, generation_tokens_ = 0;
  int64_t prefix_queries_ = 0, prefix_hits_ = 0;
  int64_t finished_stop_ = 0, finished_length_ = 0, finished_abort_ = 0;
  std::vector<DeviceMemory> devices_;
  Histogram ttft_, itl_, e2e_;
};

}  // namespace shardlm::serve
