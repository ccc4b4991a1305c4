#include "serve/metrics.h"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <sstream>

namespace shardlm::serve {

Histogram::Histogram(std::vector<double> upper_bounds) : bounds(std::move(upper_bounds)), counts(bounds.size() + 1, 0) {}

void Histogram::observe(double v) {
  const size_t b = static_cast<size_t>(std::lower_bound(bounds.begin(), bounds.end(), v) - bounds.begin());
  ++counts[b];
  sum += v;
  ++count;
}

// vLLM's buckets (seconds).
ServeMetrics::ServeMetrics()
    : ttft_({0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
             80.0, 160.0, 640.0, 2560.0}),
      itl_({0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0}),
      e2e_({0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0,
            960.0, 1920.0, 7680.0}) {}

void ServeMetrics::set_gauges(int64_t running, int64_t waiting, double kv_usage) {
  std::lock_guard<std::mutex> l(mu_);
  running_ = running;
  waiting_ = waiting;
  kv_usage_ = std::clamp(kv_usage, 0.0, 1.0);
}

void ServeMetrics::set_prefix_cache(int64_t query_tokens, int64_t hit_tokens) {
  std::lock_guard<std::mutex> l(mu_);
  prefix_queries_ = query_tokens;
  prefix_hits_ = hit_tokens;
}

void ServeMetrics::set_device_memory(std::vector<DeviceMemory> devices) {
  std::lock_guard<std::mutex> l(mu_);
  devices_ = std::move(devices);
}

void ServeMetrics::add_prompt_tokens(int64_t n) {
  std::lock_guard<std::mutex> l(mu_);
  prompt_tokens_ += n;
}

void ServeMetrics::add_generation_tokens(int64_t n) {
  std::lock_guard<std::mutex> l(mu_);
  generation_tokens_ += n;
}

void ServeMetrics::observe_ttft(double s) {
  std::lock_guard<std::mutex> l(mu_);
  ttft_.observe(s);
}

void ServeMetrics::observe_itl(double s) {
  std::lock_guard<std::mutex> l(mu_);
  itl_.observe(s);
}

void ServeMetrics::observe_e2e(double s) {
  std::lock_guard<std::mutex> l(mu_);
  e2e_.observe(s);
}

void ServeMetrics::count_finished(const std::string& reason) {
  std::lock_guard<std::mutex> l(mu_);
  if (reason == "stop")
    ++finished_stop_;
  else if (reason == "length")
    ++finished_length_;
  else
    ++finished_abort_;
}

namespace {

// The shortest of %.15g..%.17g that reads back as the same double ("0.04", not "0.040000000000000001").
std::string num(double v) {
  char buf[64];
  for (int prec = 15; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof buf, "%.*g", prec, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  return buf;
}

// Label values escape backslash, double quote and newline.
std::string escape_label(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '\\' || c == '"') o.push_back('\\');
    if (c == '\n') {
      o += "\\n";
      continue;
    }
    o.push_back(c);
  }
  return o;
}

void simple(std::ostringstream& os, const char* name, const char* type, const char* help, const std::string& labels,
            double v) {
  os << "# HELP " << name << " " << help << "\n# TYPE " << name << " " << type << "\n"
     << name << "{" << labels << "} " << num(v) << "\n";
}

void histogram(std::ostringstream& os, const char* name, const char* help, const std::string& labels,
               const Histogram& h) {
  os << "# HELP " << name << " " << help << "\n# TYPE " << name << " histogram\n";
  uint64_t cum = 0;
  for (size_t i = 0; i < h.bounds.size(); ++i) {
    cum += h.counts[i];
    os << name << "_bucket{" << labels << ",le=\"" << num(h.bounds[i]) << "\"} " << cum << "\n";
  }
  cum += h.counts.back();
  os << name << "_bucket{" << labels << ",le=\"+Inf\"} " << cum << "\n";
  os << name << "_sum{" << labels << "} " << num(h.sum) << "\n";
  os << name << "_count{" << labels << "} " << h.count << "\n";
}

}  // namespace

std::string ServeMetrics::render(const std::string& model) const {
  std::lock_guard<std::mutex> l(mu_);
  const std::string lb = "model_name=\"" + escape_label(model) + "\"";
  std::ostringstream os;
  simple(os, "shardlm:num_requests_running", "gauge", "Requests in the engine's running batch.", lb, double(running_));
  simple(os, "shardlm:num_requests_waiting", "gauge", "Requests waiting for a place in the batch.", lb, double(waiting_));
  simple(os, "shardlm:kv_cache_usage_perc", "gauge", "Share of the KV cache blocks in use (1 = full).", lb, kv_usage_);
  simple(os, "shardlm:prompt_tokens_total", "counter",
         "Prompt tokens of admitted sequences (a request of n choices counts n).", lb, double(prompt_tokens_));
  simple(os, "shardlm:generation_tokens_total", "counter", "Generated tokens.", lb, double(generation_tokens_));
  simple(os, "shardlm:prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.", lb,
         double(prefix_queries_));
  simple(os, "shardlm:prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.", lb,
         double(prefix_hits_));
  if (!devices_.empty()) {
    os << "# HELP shardlm:device_memory_used_bytes Bytes the engine of rank 0 holds on a device (weights, KV "
          "cache, workspace).\n# TYPE shardlm:device_memory_used_bytes gauge\n";
    for (const DeviceMemory& d : devices_)
      os << "shardlm:device_memory_used_bytes{" << lb << ",device=\"" << escape_label(d.device) << "\"} "
         << num(d.used_bytes) << "\n";
  }
  os << "# HELP shardlm:request_success_total Finished sequences by finish reason (a request of n choices counts n).\n"
        "# TYPE shardlm:request_success_total counter\n";
  os << "shardlm:request_success_total{" << lb << ",finished_reason=\"stop\"} " << finished_stop_ << "\n";
  os << "shardlm:request_success_total{" << lb << ",finished_reason=\"length\"} " << finished_length_ << "\n";
  os << "shardlm:request_success_total{" << lb << ",finished_reason=\"abort\"} " << finished_abort_ << "\n";
  histogram(os, "shardlm:time_to_first_token_seconds", "Time from arrival to the first generated token.", lb, ttft_);
  histogram(os, "shardlm:inter_token_latency_seconds", "Time between two generated tokens of a request.", lb, itl_);
  histogram(os, "shardlm:e2e_request_latency_seconds", "Time from arrival to the last token.", lb, e2e_);
  return os.str();
}

}  // namespace shardlm::serve
