// The ops interface's compositions on the host backends, against fp64 by hand: what a backend that does not
// fuse them must compute.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "backends/cpu/cpu_backend.h"
#include "ops/backend.h"

namespace shardlm::test {
namespace {

// A tensor-parallel group of `copies` identical members, in one process: the sum over the group is the
// buffer times `copies`. It declines the fused form, as every communicator without a device kernel does.
class CopiesGroup final : public CommGroup {
 public:
  explicit CopiesGroup(int copies) : copies_(copies) {}
  int size() const override { return copies_; }
  int rank() const override { return 0; }
  void all_reduce_sum(float* buf, size_t n) override {
    ++calls;
    for (size_t i = 0; i < n; ++i) buf[i] *= static_cast<float>(copies_);
  }
  void all_gather(const float*, float*, const std::vector<size_t>&) override {}
  void broadcast(void*, size_t, int) override {}
  void barrier() override {}
  int calls = 0;

 private:
  int copies_;
};

float value(int i, int salt) { return static_cast<float>(((i * 7919 + salt * 104729) % 2001) - 1000) / 997.0f; }

void check_all_reduce_add_rms_norm(Backend& b) {
  SCOPED_TRACE(b.name());
  const int64_t n_tok = 2, n = 96;
  const float eps = 1e-5f;
  std::vector<float> o(n_tok * n), x(n_tok * n), w(n);
  for (int i = 0; i < n_tok * n; ++i) o[i] = value(i, 1), x[i] = value(i, 2);
  for (int i = 0; i < n; ++i) w[i] = 1.0f + 0.5f * value(i, 3);
  auto buf_o = b.alloc(o.size() * 4), buf_x = b.alloc(x.size() * 4), buf_w = b.alloc(w.size() * 4),
       buf_y = b.alloc(x.size() * 4);
  b.upload(buf_o->data(), o.data(), o.size() * 4);
  b.upload(buf_x->data(), x.data(), x.size() * 4);
  b.upload(buf_w->data(), w.data(), w.size() * 4);
  CopiesGroup group(3);
  b.all_reduce_add_rms_norm(group, static_cast<float*>(buf_o->data()), static_cast<float*>(buf_x->data()),
                            static_cast<const float*>(buf_w->data()), static_cast<float*>(buf_y->data()), n_tok, n,
                            eps);
  b.synchronize();
  std::vector<float> got_x(x.size()), got_y(x.size());
  b.download(got_x.data(), buf_x->data(), got_x.size() * 4);
  b.download(got_y.data(), buf_y->data(), got_y.size() * 4);
  EXPECT_EQ(group.calls, 1);
  for (int64_t t = 0; t < n_tok; ++t) {
    double ss = 0;
    std::vector<double> xr(n);
    for (int64_t i = 0; i < n; ++i) {
      xr[i] = static_cast<double>(x[t * n + i]) + 3.0 * o[t * n + i];
      ss += xr[i] * xr[i];
    }
    const double scale = 1.0 / std::sqrt(ss / n + eps);
    for (int64_t i = 0; i < n; ++i) {
      // x: 3 * o rounded once (|3 o| <= 3, so by <= 1.8e-7: the absolute part), then the add, rounded once.
      EXPECT_NEAR(got_x[t * n + i], xr[i], 1e-6 + 2.4e-7 * std::fabs(xr[i])) << "x[" << t << "][" << i << "]";
      // y: fp32 sum of 96 squares (<= 96 roundings of positive terms: 5.7e-6 relative), sqrt, divide and
      // two products.
      const double yr = xr[i] * scale * w[i];
      EXPECT_NEAR(got_y[t * n + i], yr, 1e-6 + 1e-5 * std::fabs(yr)) << "y[" << t << "][" << i << "]";
    }
  }
}

// Backend::all_reduce_add_rms_norm's default: the group's sum, then the residual add and the norm.
TEST(BackendOps, AllReduceAddRmsNormIsTheSumThenTheNorm) {
  check_all_reduce_add_rms_norm(*make_reference_backend());
  check_all_reduce_add_rms_norm(*make_cpu_backend(1));
}

}  // namespace
}  // namespace shardlm::test
