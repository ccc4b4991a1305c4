// The ops interface: everything the model math needs from a device, and nothing about which device.
//
// Model code (src/model) calls only this interface and the Communicator; backends (reference, CPU, CUDA)
// implement it. Activations are float32, row-major (n_tok, width), in the backend's own memory; weights are
// typed (any GgmlType the backend supports) and stored as rows of ne[0] elements, like GGUF.
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "core/dtype.h"
#include "core/error.h"
#include "ops/batch.h"
#include "ops/candidates.h"

namespace shardlm {

enum class DeviceKind { kCpu, kCuda };

// Owning allocation in a backend's memory; freed by its destructor.
class DeviceBuffer {
 public:
  virtual ~DeviceBuffer() = default;
  virtual void* data() = 0;
  virtual size_t size() const = 0;
  template <typename T>
  T* as() { return static_cast<T*>(data()); }
};

// Non-owning view of a 2-D weight matrix: n_rows rows of n_cols elements of `type`, `row_stride` bytes
// apart. For GGUF tensors n_cols = ne[0], n_rows = ne[1].
struct WeightView {
  GgmlType type = GgmlType::F32;
  int64_t n_cols = 0;       // elements per row (input width of a matmul)
  int64_t n_rows = 0;       // rows (output width of a matmul)
  size_t row_stride = 0;    // bytes between rows
  const void* data = nullptr;
  // Rows are in the placing backend's own layout (see Backend::place_matmul_weight), not ggml's: only that
  // backend's matmul/matmul_group may read them.
  bool packed = false;
};

class Backend {
 protected:
  [[noreturn]] void no_device_tokens(const char* what) const {
    fail_kind(ErrorKind::kInternal, name(), ": ", what, ": this backend keeps no device token");
  }

 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual DeviceKind device() const = 0;
  // Whether matmul/get_rows accept weights of this type.
  virtual bool supports(GgmlType weight_type) const = 0;

  // Memory.
  virtual std::unique_ptr<DeviceBuffer> alloc(size_t bytes) = 0;
  virtual void upload(void* dst, const void* host_src, size_t bytes) = 0;
  virtual void download(void* host_dst, const void* src, size_t bytes) = 0;
  virtual void synchronize() = 0;
  // Bytes this backend has allocated and still holds (for per-device memory reports).
  virtual size_t allocated_bytes() const = 0;
  // Whether place_matmul_weight rearranges w (its type) for this backend's kernels: a host backend's loader
  // then places the weight instead of reading the file's mapping in place.
  virtual bool packs_matmul_weight(const WeightView& /*w*/) const { return false; }
  // Copies a weight that only matmul/matmul_group will read (host memory, ggml rows) into this backend's
  // memory; `storage` receives the allocation. A backend may keep it in a layout its kernels read faster
  // (the returned view then has packed = true). The default copies the rows as they are.
  virtual WeightView place_matmul_weight(const WeightView& host /* ggml rows in host memory */,
                                         std::vector<std::unique_ptr<DeviceBuffer>>& storage) {
    const size_t bytes = host.row_stride * static_cast<size_t>(host.n_rows);
    auto buf = alloc(bytes);
    upload(buf->data(), host.data, bytes);
    WeightView v = host;
    v.data = buf->data();
    storage.push_back(std::move(buf));
    return v;
  }

  // Token selection without moving the logits: for each row r of logits (rows.size(), n; this backend's
  // memory), the min(k, n) first entries in candidate order (ops/candidates.h; ids are indices into the row)
  // and the row's logits at rows[r].extra, into out[r]. Waits once, for all rows (a step's rows are asked
  // together: one wait per step, not per sequence). The default downloads the rows and ranks them on the host.
  virtual void top_candidates(const float* logits /* (rows.size(), n) */, int64_t n, const std::vector<CandidateQuery>& rows,
                              std::vector<CandidateAnswer>& out) {
    std::vector<float> host(static_cast<size_t>(n) * rows.size());
    download(host.data(), logits, host.size() * sizeof(float));
    top_candidates_of_host_rows(host.data(), n, rows, out);
  }
  static void top_candidates_of_host_rows(const float* logits /* (rows.size(), n), host */, int64_t n,
                                          const std::vector<CandidateQuery>& rows, std::vector<CandidateAnswer>& out) {
    out.assign(rows.size(), CandidateAnswer{});
    for (size_t r = 0; r < rows.size(); ++r) {
      const float* row = logits + r * static_cast<size_t>(n);
      out[r].top = top_candidates_host(row, n, rows[r].k);
      for (int32_t e : rows[r].extra) out[r].extra_values.push_back(row[e]);
    }
  }

  // The row's largest finite value (-inf if none) and sum(exp(logits - max)) in double, for log-probabilities;
  // every tensor-parallel rank computes its slice's and the pairs are combined. The default downloads.
  virtual void log_sum_exp_parts(const float* logits /* (n) */, int64_t n, double* max_out, double* sum_out) {
    std::vector<float> host(static_cast<size_t>(n));
    download(host.data(), logits, host.size() * sizeof(float));
    log_sum_exp_parts_host(host.data(), n, max_out, sum_out);
  }
  static void log_sum_exp_parts_host(const float* logits, int64_t n, double* max_out, double* sum_out);

  // Sets the batch (sequences, positions, block tables) that every following op of this step uses. Backends
  // that capture a step once and replay it (CUDA graphs) keep it in their own memory, so ops take no
  // positions of their own.
  virtual void begin_step(const BatchInfo& batch) = 0;
  // Positions per KV cache block this backend's kernels address (KvLayerView::block_size) for a context of
  // n_ctx positions: paged backends answer a small block; one whose kernels read a sequence's cache as one
  // contiguous range answers n_ctx (a block per sequence).
  virtual int64_t kv_block_size(int64_t /*n_ctx*/) const { return kKvBlockSize; }
  static constexpr int64_t kKvBlockSize = 16;

  // ---- Greedy decoding with the token kept in device memory ----
  // A backend that keeps the step's input token in its own memory lets the host enqueue the next decode
  // step before it has read this one's token (no host round trip between steps; LlamaModel::step_greedy).
  // Whether the four calls below are implemented.
  virtual bool device_tokens() const { return false; }
  // The device token becomes `id` (stream-ordered after the work already enqueued; not inside a capture).
  virtual void set_device_token(int32_t /*id*/) { no_device_tokens("set_device_token"); }
  // out = the device token's row of `table` (one token).
  virtual void get_rows_device_token(const WeightView& /*table*/ /* (n_vocab rows, n_embd) */,
                                     float* /*out*/ /* (n_embd) */) {
    no_device_tokens("get_rows_device_token");
  }
  // This member's best logit of logits (n) and its id + id_offset into slot `slot` of `cands`, every other
  // slot zero, encoded so that summing the members' `cands` (an all-reduce) is exact: slot s holds the
  // candidate key's (ops/candidates.h) ordered logit bits as two 16-bit integers, then the id (-1: no
  // finite logit), then 0, all as float values.
  virtual void greedy_candidate(const float* /*logits*/ /* (n) */, int64_t /*n*/, int64_t /*id_offset*/,
                                float* /*cands*/ /* (n_slots, 4) */, int /*slot*/, int /*n_slots*/) {
    no_device_tokens("greedy_candidate");
  }
  // The best of the n_slots candidates (candidate order) becomes the device token and the token that
  // device_token_at(pos0 of this step) returns.
  virtual void greedy_pick(const float* /*cands*/ /* (n_slots, 4) */, int /*n_slots*/) { no_device_tokens("greedy_pick"); }
  // Marks the end of the step at `pos` (after its greedy_pick was enqueued, outside any capture).
  virtual void mark_device_token(int64_t /*pos*/) { no_device_tokens("mark_device_token"); }
  // Waits for the step at `pos` and returns the token its greedy_pick chose (-1: no finite logit). At most
  // the two latest marked steps can be asked for.
  virtual int32_t device_token_at(int64_t /*pos*/) {
    no_device_tokens("device_token_at");
    return -1;
  }

  // out[t] = row ids[t] of `table` dequantized to f32. `ids` is (n_tok) in host memory.
  virtual void get_rows(const WeightView& table /* (n_vocab rows, n_embd) */, const int32_t* ids, int64_t n_tok,
                        float* out /* (n_tok, n_embd) */) = 0;
  // out[i] = x[rows[i]]: the rows of a step that need logits, gathered before the output head. `rows` is
  // (n_rows) in host memory.
  virtual void gather_rows(const float* x /* (n_tok, width) */, const int32_t* rows /* (n_rows) */, int64_t n_rows,
                           int64_t width, float* out /* (n_rows, width) */) = 0;
  // y = x / rms(x) * w per token row.
  virtual void rms_norm(const float* x /* (n_tok, n) */, const float* w /* (n) */, float* y /* (n_tok, n) */,
                        int64_t n_tok, int64_t n, float eps) = 0;
  // y[t, r] = sum_c w[r, c] * x[t, c].
  virtual void matmul(const WeightView& w /* (n_rows, n_cols) */, const float* x /* (n_tok, n_cols) */,
                      float* y /* (n_tok, n_rows) */, int64_t n_tok) = 0;
  // matmul, for a y whose sum over `group` the next group call takes (all_reduce_add_rms_norm): a backend
  // whose kernel can push y's words to the other members itself (CommGroup::device_push_target) does.
  virtual void matmul_reduce(CommGroup& /*group*/, const WeightView& w /* (n_rows, n_cols) */,
                             const float* x /* (n_tok, n_cols) */, float* y /* (n_tok, n_rows) */, int64_t n_tok) {
    matmul(w, x, y, n_tok);
  }
  // Several matmuls of the same input (q/k/v, gate/up): ys[i] = ws[i] x. Backends may run them as one
  // launch, which matters for decode where each alone is too small to fill a GPU.
  virtual void matmul_group(const WeightView* ws /* (n) */, int n, const float* x /* (n_tok, n_cols) */,
                            float* const* ys /* (n) each (n_tok, ws[i].n_rows) */, int64_t n_tok) {
    for (int i = 0; i < n; ++i) matmul(ws[i], x, ys[i], n_tok);
  }
  // Experts' matmuls over rows grouped by expert (ggml's MUL_MAT_ID, mixture of experts): for every set s
  // and expert e with rows, ys[s] rows [bounds[e], bounds[e+1]) = sets[s][e] x rows [bounds[e], bounds[e+1]).
  // Every expert of a set has the same shape. The default runs matmul_group per expert; a backend may run
  // all experts' rows as one parallel job (the CPU's: one dispatch of its threads instead of one per expert
  // and set, which at batch 1 costs more than the rows themselves).
  virtual void matmul_experts(const WeightView* const* sets /* (n_sets) each (n_experts) */, int n_sets,
                              int n_experts, const int64_t* bounds /* (n_experts + 1) row offsets, host */,
                              const float* x /* (bounds[n_experts], n_cols) */,
                              float* const* ys /* (n_sets) each (bounds[n_experts], sets[s][0].n_rows) */) {
    for (int e = 0; e < n_experts; ++e) {
      const int64_t r0 = bounds[e], n = bounds[e + 1] - r0;
      if (n <= 0) continue;
      WeightView ws[4];
      float* outs[4];
      for (int s0 = 0; s0 < n_sets; s0 += 4) {
        const int m = std::min(4, n_sets - s0);
        for (int i = 0; i < m; ++i) {
          ws[i] = sets[s0 + i][e];
          outs[i] = ys[s0 + i] + r0 * ws[i].n_rows;
        }
        matmul_group(ws, m, x + r0 * ws[0].n_cols, outs, n);
      }
    }
  }
  // y[t, i] += b[i].
  virtual void add_bias(float* y /* (n_tok, n) */, const float* b /* (n) */, int64_t n_tok, int64_t n) = 0;
  // out[t] = sum over j < k with rows[t*k + j] >= 0 of w[t*k + j] * y[rows[t*k + j]]: each token's chosen
  // experts' outputs summed with their router weights (mixture of experts); a negative row is an expert
  // another rank holds (expert parallelism), and a token with none here gets zeros. rows and w are host
  // memory. The default downloads y, sums on the host and uploads out.
  virtual void weighted_row_sum(const float* y /* (n_y, width) */, int64_t n_y, const int32_t* rows /* (n_out * k) */,
                                const float* w /* (n_out * k) */, int64_t n_out, int k, int64_t width,
                                float* out /* (n_out, width) */) {
    std::vector<float> hy(static_cast<size_t>(n_y * width)), ho(static_cast<size_t>(n_out * width), 0.0f);
    if (n_y > 0) download(hy.data(), y, hy.size() * sizeof(float));
    for (int64_t t = 0; t < n_out; ++t)
      for (int j = 0; j < k; ++j) {
        const int32_t r = rows[t * k + j];
        if (r < 0) continue;
        if (r >= n_y) fail_kind(ErrorKind::kInternal, "weighted_row_sum: row ", r, " outside [0, ", n_y, ")");
        const float wj = w[t * k + j];
        const float* yr = hy.data() + r * width;
        float* o = ho.data() + t * width;
        for (int64_t i = 0; i < width; ++i) o[i] += wj * yr[i];
      }
    upload(out, ho.data(), ho.size() * sizeof(float));
  }
  // y[i] += x[i].
  virtual void add(float* y /* (n) */, const float* x /* (n) */, int64_t n) = 0;
  // out = silu(gate) * up, element-wise.
  virtual void swiglu(const float* gate /* (n) */, const float* up /* (n) */, float* out /* (n) */, int64_t n) = 0;
  // x += delta, then y = x / rms(x) * w per token row: the residual add before a norm, in one pass where a
  // backend can (the default is add then rms_norm, with the same results).
  virtual void add_rms_norm(float* x /* (n_tok, n) */, const float* delta /* (n_tok, n) */, const float* w /* (n) */,
                            float* y /* (n_tok, n) */, int64_t n_tok, int64_t n, float eps) {
    add(x, delta, n_tok * n);
    rms_norm(x, w, y, n_tok, n, eps);
  }
  // buf = its sum over `group` (the all-reduce after a row-parallel matmul), then add_rms_norm(x, buf, w, y).
  // One kernel where the backend and the group can (CUDA with the NCCL one-shot path, for one row; the
  // norm's sum of squares is then added in another order); the default is the two calls. `buf` must be
  // memory the group can reduce in place (the model stages device memory through the host otherwise).
  virtual void all_reduce_add_rms_norm(CommGroup& group, float* buf /* (n_tok, n) */, float* x /* (n_tok, n) */,
                                       const float* w /* (n) */, float* y /* (n_tok, n) */, int64_t n_tok, int64_t n,
                                       float eps) {
    group.all_reduce_sum(buf, static_cast<size_t>(n_tok * n));
    add_rms_norm(x, buf, w, y, n_tok, n, eps);
  }
  // rope(q), rope(k), then kv_store(kv, k, v): one pass where a backend can (same results).
  virtual void rope_kv_store(float* q /* (n_tok, n_head, head_dim) */, float* k /* (n_tok, n_head_kv, head_dim) */,
                             const float* v /* (n_tok, n_head_kv, head_dim) */, const KvLayerView& kv, int64_t n_tok,
                             int64_t n_head, float freq_base, const float* freq_factors /* (head_dim/2) or null, host */) {
    rope(q, n_tok, n_head, kv.head_dim, freq_base, freq_factors);
    rope(k, n_tok, kv.n_head_kv, kv.head_dim, freq_base, freq_factors);
    kv_store(kv, k, v, n_tok);
  }
  // rope_kv_store, then attention(q, kv, n_tok, n_head, out): one pass where a backend can (same results,
  // except that q and k may be left unrotated).
  virtual void rope_attention(float* q /* (n_tok, n_head, head_dim) */, float* k /* (n_tok, n_head_kv, head_dim) */,
                              const float* v /* (n_tok, n_head_kv, head_dim) */, const KvLayerView& kv, int64_t n_tok,
                              int64_t n_head, float freq_base, const float* freq_factors /* (head_dim/2) or null, host */,
                              float* out /* (n_tok, n_head, head_dim) */) {
    rope_kv_store(q, k, v, kv, n_tok, n_head, freq_base, freq_factors);
    attention(q, kv, n_tok, n_head, out);
  }
  // Rotates adjacent pairs (x[2i], x[2i+1]) of every head by angle pos * theta_i, theta_i =
  // freq_base^(-2i/head_dim) / freq_factors[i] (freq_factors may be null), pos = token t's position in the
  // batch.
  virtual void rope(float* x /* (n_tok, n_heads, head_dim) */, int64_t n_tok, int64_t n_heads, int64_t head_dim,
                    float freq_base, const float* freq_factors /* (head_dim/2) or null, host */) = 0;
  // Writes each token's K and V rows into its sequence's cache at its position (the batch's block tables).
  virtual void kv_store(const KvLayerView& kv, const float* k /* (n_tok, n_head_kv, head_dim) */,
                        const float* v /* (n_tok, n_head_kv, head_dim) */, int64_t n_tok) = 0;
  // Causal attention of each token's queries over its own sequence's cache positions [0, pos], pos being the
  // token's position, grouped-query: query head h reads KV head h / (n_head / n_head_kv). Scale
  // 1/sqrt(head_dim).
  virtual void attention(const float* q /* (n_tok, n_head, head_dim) */, const KvLayerView& kv, int64_t n_tok,
                         int64_t n_head, float* out /* (n_tok, n_head, head_dim) */) = 0;
};

// Plain, single-threaded implementation with fp64 accumulation: the yardstick for every other backend.
std::unique_ptr<Backend> make_reference_backend();

}  // namespace shardlm
