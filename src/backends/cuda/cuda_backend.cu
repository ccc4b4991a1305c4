// CudaBackend: argument checks, buffers, dispatch to the kernels, cuBLAS for prefill, CUDA graphs.
#include "backends/cuda/cuda_backend_impl.cuh"
#include "backends/cuda/mv_common.cuh"
#include "backends/cuda/pack.h"
#include "backends/cuda/quant_x.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <string>
#include <utility>

namespace shardlm {
namespace cuda_detail {
namespace {

constexpr size_t kAlign = 256;                     // allocation granularity: every 16-byte load stays inside
constexpr size_t kCublasWorkspace = 32u << 20;     // fixed workspace so GEMMs can be captured
constexpr size_t kDequantScratch = 64u << 20;      // max bytes of 16-bit weights dequantized per GEMM chunk
constexpr int64_t kQuantMatvecMaxTok = 8;          // up to this many tokens, quantized matmul = matvec per token

size_t round_up(size_t n, size_t a) { return (n + a - 1) / a * a; }

class CudaBuffer final : public DeviceBuffer {
 public:
  CudaBuffer(size_t bytes, std::shared_ptr<std::atomic<int64_t>> counter)
      : mem_(round_up(std::max<size_t>(bytes, 1), kAlign)), size_(bytes), counter_(std::move(counter)) {
    *counter_ += static_cast<int64_t>(mem_.size());
  }
  ~CudaBuffer() override { *counter_ -= static_cast<int64_t>(mem_.size()); }
  void* data() override { return mem_.get(); }
  size_t size() const override { return size_; }

 private:
  DevMem mem_;
  size_t size_;
  std::shared_ptr<std::atomic<int64_t>> counter_;
};

// F32/F16/BF16, Q8_0/Q4_0/Q4_K/Q6_K (fast matvecs; the packed layout for the quantized four) and the
// grouped types (kernels.cuh's dq_grouped: the generic kernels everywhere).
bool is_supported(GgmlType t) {
  switch (t) {
    case GgmlType::F32:
    case GgmlType::F16:
    case GgmlType::BF16:
    case GgmlType::Q8_0:
    case GgmlType::Q4_0:
    case GgmlType::Q4_K:
    case GgmlType::Q6_K:
      return true;
    default:
      return dq_grouped(t);
  }
}

void check_weight(const WeightView& w, const char* op) {
  if (!is_supported(w.type))
    fail_kind(ErrorKind::kUnsupported, "cuda ", op, ": weight type ", type_name(w.type), " is not supported");
  if (w.n_rows <= 0 || w.n_cols <= 0 || w.data == nullptr) fail("cuda ", op, ": empty weight view");
  if (w.n_cols % block_size(w.type) != 0)
    fail("cuda ", op, ": n_cols ", w.n_cols, " is not a multiple of the ", type_name(w.type), " block size ",
         block_size(w.type));
  if (w.row_stride < static_cast<size_t>(row_bytes(w.type, w.n_cols)))
    fail("cuda ", op, ": row_stride ", w.row_stride, " is smaller than a row (", row_bytes(w.type, w.n_cols), ")");
}

int checked_int(int64_t v, const char* what) {
  if (v < 0 || v > INT_MAX) fail_kind(ErrorKind::kUnsupported, "cuda matmul: ", what, " = ", v, " exceeds cuBLAS's int");
  return static_cast<int>(v);
}

}  // namespace

CudaBackend& as_cuda(Backend& b, const char* caller) {
  auto* c = dynamic_cast<CudaBackend*>(&b);
  if (!c) fail(caller, ": backend '", b.name(), "' is not a CUDA backend");
  return *c;
}

CudaBackend::CudaBackend(int device, GgmlType kv_type, const CudaTuning& tuning)
    : device_(device), kv_type_(kv_type), user_bytes_(std::make_shared<std::atomic<int64_t>>(0)) {
  const int count = cuda_device_count();
  if (device < 0 || device >= count)
    fail("cuda backend: device index ", device, " is out of range (", count, " CUDA device(s) visible)");
  if (kv_type != GgmlType::F16 && kv_type != GgmlType::F32)
    fail("cuda backend: KV cache type must be f16 or f32, got ", type_name(kv_type));
  // Kernel switches (core/cuda_tuning.h), each checked: the struct may come from any caller.
  const auto bad = [](const char* field, const char* var, auto value, const char* allowed) {
    fail("cuda backend: CudaTuning::", field, " (", var, ") = ", value, ": expected ", allowed);
  };
  if (tuning.attn_blocks_per_kv_head != 0 && tuning.attn_blocks_per_kv_head != 1 &&
      tuning.attn_blocks_per_kv_head != 2 && tuning.attn_blocks_per_kv_head != 4)
    bad("attn_blocks_per_kv_head", "SHARDLM_CUDA_ATTN_BLOCKS_PER_KV_HEAD", tuning.attn_blocks_per_kv_head,
        "0 (by the local KV heads), 1, 2 or 4");
  if (tuning.pk_variant < 0 || tuning.pk_variant > 4) bad("pk_variant", "SHARDLM_PK_VARIANT", tuning.pk_variant, "0 to 4");
  if (tuning.tokens_max < 0 || tuning.tokens_max > 4096)
    bad("tokens_max", "SHARDLM_CUDA_TOKENS_MAX", tuning.tokens_max, "0 (by weight type) to 4096");
  if (tuning.mma_max < 0) bad("mma_max", "SHARDLM_CUDA_MMA_MAX", tuning.mma_max, "0 (never) or more");
  pack_weights_ = tuning.pack_weights;
  prequant_ = tuning.prequant;
  fuse_rope_ = tuning.fuse_rope;
  attn_out4_ = tuning.attn_out4;
  // Unset (0): chosen by the local KV heads in attention_decode (more blocks shorten each warp's chain of
  // products where a short context has few KV heads' blocks to run at all, e.g. 2 per rank for 70B at tp 4,
  // where 4 gained a few percent; docs/BENCHMARKS.md, Decisions in the source).
  attn_qsplit_ = tuning.attn_blocks_per_kv_head;
  attn_last_block_combine_ = tuning.attn_last_block_combine;
  pk_variant_ = tuning.pk_variant;
  tokens_max_ = tuning.tokens_max;
  mma_max_ = tuning.mma_max;
  graph_timing_ = tuning.graph_timing;
  // Measurement only, the outputs become meaningless: one-token kernels of the listed kinds are not launched,
  // so that a decode step's time without them shows what they cost inside the graph (scripts/gpu/x1env.sh).
  if (!tuning.skip.empty()) {
    const std::string& v = tuning.skip;
    static constexpr std::pair<const char*, int> kKinds[] = {{"none", 0},         {"norm", kSkipNorm},
                                                             {"swiglu", kSkipSwiglu}, {"rope", kSkipRope},
                                                             {"attn", kSkipAttn},     {"mv", kSkipMatvec},
                                                             {"ar", kSkipAllReduce}};
    for (size_t b = 0; b <= v.size();) {
      const size_t e = std::min(v.find(',', b), v.size());
      const std::string kind = v.substr(b, e - b);
      const auto* k = std::find_if(std::begin(kKinds), std::end(kKinds), [&](const auto& kk) { return kind == kk.first; });
      if (k == std::end(kKinds))
        fail("cuda backend: CudaTuning::skip (SHARDLM_CUDA_SKIP) = '", v, "': '", kind,
             "' is not one of none, norm, swiglu, rope, attn, mv, ar");
      skip_ |= k->second;
      b = e + 1;
    }
    if (skip_ != 0)
      std::fprintf(stderr, "shardlm: SHARDLM_CUDA_SKIP=%s: decode kernels are skipped, outputs are meaningless\n", v.c_str());
  }
  DeviceGuard g(device_);
  SHARDLM_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, device_));
  stream_ = std::make_unique<Stream>();
  cublas_ = std::make_unique<CublasHandle>();
  SHARDLM_CUBLAS_CHECK(cublasSetStream(cublas_->get(), stream_->get()));
  cublas_ws_ = DevMem(kCublasWorkspace);
  SHARDLM_CUBLAS_CHECK(cublasSetWorkspace(cublas_->get(), cublas_ws_.get(), cublas_ws_.size()));
  SHARDLM_CUBLAS_CHECK(cublasSetMathMode(cublas_->get(), CUBLAS_DEFAULT_MATH));  // no TF32 for f32 weights
  step_cap_ = 1;  // one sequence; begin_step grows it for larger batches
  step_dev_ = DevMem(sizeof(StepDev));
  step_host_ = PinnedMem(kStepSlots * sizeof(StepDev));
  for (auto& e : step_ev_) e = std::make_unique<Event>(cudaEventDisableTiming);
  for (auto& e : tok_ev_) e = std::make_unique<Event>(cudaEventDisableTiming);
  const StepDev zero{0, 0, 0, 0};
  SHARDLM_CUDA_CHECK(cudaMemcpyAsync(step_dev_.get(), &zero, sizeof zero, cudaMemcpyHostToDevice, stream_->get()));
  xq_ = DevMem(static_cast<size_t>(quant_x_words(kXqMaxCols)) * sizeof(int32_t));
  argmax_dev_ = DevMem(sizeof(int32_t));
  argmax_key_ = DevMem(sizeof(unsigned long long));
  argmax_host_ = PinnedMem(sizeof(int32_t));
  tok_dev_ = DevMem(sizeof(int32_t));
  tok_host_ = PinnedMem(2 * sizeof(int32_t));
  SHARDLM_CUDA_CHECK(cudaMemsetAsync(tok_dev_.get(), 0, sizeof(int32_t), stream_->get()));
  SHARDLM_CUDA_CHECK(cudaStreamSynchronize(stream_->get()));
}

CudaBackend::~CudaBackend() {
  // Let queued work finish before its buffers go away; errors are already reported by the failing call.
  if (stream_) {
    if (capturing_) {
      cudaGraph_t g = nullptr;
      cudaStreamEndCapture(stream_->get(), &g);
      if (g) cudaGraphDestroy(g);
    }
    cudaStreamSynchronize(stream_->get());
  }
}

std::string CudaBackend::name() const {
  cudaDeviceProp p{};
  if (cudaGetDeviceProperties(&p, device_) != cudaSuccess) return cat("cuda:", device_);
  return cat("cuda:", device_, " (", p.name, ")");
}

bool CudaBackend::supports(GgmlType t) const { return is_supported(t); }

void CudaBackend::not_while_capturing(const char* what) const {
  if (capturing_)
    fail_kind(ErrorKind::kUnsupported, "cuda ", what,
              " cannot run inside a CUDA graph capture (it needs the host); call it outside CudaGraphRunner::run's body");
}

std::unique_ptr<DeviceBuffer> CudaBackend::alloc(size_t bytes) {
  note_write();
  not_while_capturing("alloc");
  DeviceGuard g(device_);
  return std::make_unique<CudaBuffer>(bytes, user_bytes_);
}

WeightView CudaBackend::place_matmul_weight(const WeightView& host, std::vector<std::unique_ptr<DeviceBuffer>>& storage) {
  check_weight(host, "place_matmul_weight");
  if (!pack_weights_ || !packable(host.type, host.n_cols) || host.packed)
    return Backend::place_matmul_weight(host, storage);
  const size_t stride = packed_row_stride(host.type, host.n_cols);
  auto buf = alloc(checked_mul<size_t>(stride, static_cast<size_t>(host.n_rows), "packed weight bytes"));
  // Packed on the host in slices of ~32 MB, each uploaded before the next is packed.
  const int64_t chunk = std::max<int64_t>(1, static_cast<int64_t>((32u << 20) / stride));
  std::vector<uint8_t> tmp(static_cast<size_t>(std::min(chunk, host.n_rows)) * stride);
  const auto* src = static_cast<const uint8_t*>(host.data);
  for (int64_t r0 = 0; r0 < host.n_rows; r0 += chunk) {
    const int64_t rows = std::min(chunk, host.n_rows - r0);
    pack_rows(host.type, src + static_cast<size_t>(r0) * host.row_stride, host.row_stride, rows, host.n_cols,
              tmp.data());
    upload(buf->as<uint8_t>() + static_cast<size_t>(r0) * stride, tmp.data(), static_cast<size_t>(rows) * stride);
  }
  WeightView v = host;
  v.data = buf->data();
  v.row_stride = stride;
  v.packed = true;
  has_packed_ = true;
  storage.push_back(std::move(buf));
  return v;
}

void CudaBackend::upload(void* dst, const void* host_src, size_t bytes) {
  note_write();
  not_while_capturing("upload");
  if (bytes == 0) return;
  DeviceGuard g(device_);
  SHARDLM_CUDA_CHECK(cudaMemcpyAsync(dst, host_src, bytes, cudaMemcpyHostToDevice, stream()));
  SHARDLM_CUDA_CHECK(cudaStreamSynchronize(stream()));
}

void CudaBackend::download(void* host_dst, const void* src, size_t bytes) {
  not_while_capturing("download");
  if (bytes == 0) return;
  DeviceGuard g(device_);
  SHARDLM_CUDA_CHECK(cudaMemcpyAsync(host_dst, src, bytes, cudaMemcpyDeviceToHost, stream()));
  SHARDLM_CUDA_CHECK(cudaStreamSynchronize(stream()));
}

void CudaBackend::synchronize() {
  not_while_capturing("synchronize");
  DeviceGuard g(device_);
  SHARDLM_CUDA_CHECK(cudaStreamSynchronize(stream()));
}

size_t CudaBackend::allocated_bytes() const {
  size_t s = static_cast<size_t>(user_bytes_->load());
  s += cublas_ws_.size() + step_dev_.size() + argmax_dev_.size() + argmax_key_.size() + ids_dev_.size() + attn_part_.size() +
       x16_.size() + w16_.size() + xq_.size() + topk_a_.size() + topk_b_.size() + extra_ids_.size() + extra_vals_.size();
  for (const auto& f : freq_cache_) s += f.dev.size();
  return s;
}

void* CudaBackend::scratch(DevMem& buf, size_t bytes, const char* what) {
  if (buf.size() >= bytes) return buf.get();
  if (capturing_)
    fail_kind(ErrorKind::kInternal, "cuda: scratch buffer '", what, "' must grow to ", bytes,
              " bytes during a graph capture; CudaGraphRunner runs the body once eagerly to avoid this, so the "
              "body changed shape between calls");
  // Queued kernels may still read the old buffer: free it only after they ran.
  SHARDLM_CUDA_CHECK(cudaStreamSynchronize(stream()));
  buf = DevMem(round_up(bytes + bytes / 4, kAlign));
  ++scratch_gen_;
  return buf.get();
}

int* CudaBackend::attention_counters(int64_t n) {
  const size_t bytes = static_cast<size_t>(n) * sizeof(int);
  if (attn_done_.size() >= bytes) return attn_done_.as<int>();
  if (capturing_)
    fail_kind(ErrorKind::kInternal, "cuda: the decode attention's ", n, " split counters must be made during a graph "
              "capture; CudaGraphRunner runs the body once eagerly to avoid this");
  // The kernels leave every counter at 0 when they finish; a larger set replaces the old one after the
  // queued kernels that use it.
  SHARDLM_CUDA_CHECK(cudaStreamSynchronize(stream()));
  attn_done_ = DevMem(round_up(bytes, kAlign));
  SHARDLM_CUDA_CHECK(cudaMemsetAsync(attn_done_.get(), 0, attn_done_.size(), stream()));
  return attn_done_.as<int>();
}

const float* CudaBackend::freq_factors_on_device(const float* host, int64_t n) {
  if (!host) return nullptr;
  for (auto& f : freq_cache_)
    if (f.key == host && static_cast<int64_t>(f.values.size()) == n &&
        std::memcmp(f.values.data(), host, n * sizeof(float)) == 0)
      return f.dev.as<float>();
  if (capturing_)
    fail_kind(ErrorKind::kInternal, "cuda rope: new freq_factors inside a graph capture; run the body eagerly first");
  FreqFactors f{host, std::vector<float>(host, host + n), DevMem(n * sizeof(float))};
  SHARDLM_CUDA_CHECK(cudaMemcpyAsync(f.dev.get(), f.values.data(), n * sizeof(float), cudaMemcpyHostToDevice, stream()));
  SHARDLM_CUDA_CHECK(cudaStreamSynchronize(stream()));  // f.values may move when the vector grows
  // Same host pointer with new contents: replace the old entry (after the sync above nothing reads it).
  std::erase_if(freq_cache_, [&](const FreqFactors& e) { return e.key == host; });
  freq_cache_.push_back(std::move(f));
  ++scratch_gen_;
  return freq_cache_.back().dev.as<float>();
}

namespace {

// "(pos0 5, 1 token, block 0), ..." for errors about a batch: its sequences, at most 4 of them.
std::string describe_batch(const BatchInfo& b) {
  std::string out = cat(b.n_tok, " tokens in ", b.n_seq(), " sequence(s):");
  for (int64_t s = 0; s < b.n_seq() && s < 4; ++s) {
    const BatchSeq& q = b.seqs[static_cast<size_t>(s)];
    const bool has_block = b.max_blocks > 0 && static_cast<int64_t>(b.block_table.size()) >= (s + 1) * b.max_blocks;
    out += cat(" (pos0 ", q.pos0, ", ", q.n_tok, " token(s), block ", has_block ? b.blocks(s)[0] : -1, ")");
  }
  if (b.n_seq() > 4) out += " ...";
  return out;
}

// Whether a and b launch the same kernels on the same data: token counts, positions and each sequence's
// cache block (the only block this backend reads).
bool same_batch(const BatchInfo& a, const BatchInfo& b) {
  if (a.n_tok != b.n_tok || a.n_seq() != b.n_seq()) return false;
  for (int64_t s = 0; s < a.n_seq(); ++s) {
    const BatchSeq &x = a.seqs[static_cast<size_t>(s)], &y = b.seqs[static_cast<size_t>(s)];
    if (x.tok0 != y.tok0 || x.n_tok != y.n_tok || x.pos0 != y.pos0 || a.blocks(s)[0] != b.blocks(s)[0]) return false;
  }
  return true;
}

}  // namespace

void CudaBackend::reserve_steps(int64_t n) {
  if (n <= step_cap_) return;
  if (capturing_)
    fail_kind(ErrorKind::kInternal, "cuda begin_step: room for ", n, " sequences must be made during a graph capture");
  // Queued kernels may still read step_dev_ and queued copies the pinned slots: replace them after those ran.
  SHARDLM_CUDA_CHECK(cudaStreamSynchronize(stream()));
  const int64_t cap = std::max(n, 2 * step_cap_);
  step_dev_ = DevMem(static_cast<size_t>(cap) * sizeof(StepDev));
  step_host_ = PinnedMem(static_cast<size_t>(kStepSlots * cap) * sizeof(StepDev));
  step_cap_ = cap;
  ++scratch_gen_;  // graphs captured before hold the old step_dev_
}

void CudaBackend::begin_step(const BatchInfo& batch) {
  note_write();
  // The structure the ops rely on (BatchInfo::validate checks the rest against the pool; the ops check each
  // sequence against their KV view, check_kv).
  const int64_t n_seq = batch.n_seq();
  if (n_seq < 1) fail("cuda begin_step: the batch has no sequence");
  if (batch.max_blocks < 1 || static_cast<int64_t>(batch.block_table.size()) != n_seq * batch.max_blocks)
    fail("cuda begin_step: the block table holds ", batch.block_table.size(), " entries for ", n_seq,
         " sequence(s) of ", batch.max_blocks, " block(s) (max_blocks must be >= 1)");
  int64_t next = 0;
  for (int64_t s = 0; s < n_seq; ++s) {
    const BatchSeq& q = batch.seqs[static_cast<size_t>(s)];
    if (q.tok0 != next || q.n_tok < 1 || q.pos0 < 0)
      fail("cuda begin_step: sequence ", s, " has tokens [", q.tok0, ", +", q.n_tok, ") at position ", q.pos0,
           "; expected tokens from ", next, ", at least one, at a position >= 0");
    if (batch.blocks(s)[0] < 0)
      fail("cuda begin_step: sequence ", s, " has no cache block (block id ", batch.blocks(s)[0], ")");
    next += q.n_tok;
  }
  if (next != batch.n_tok)
    fail("cuda begin_step: the sequences hold ", next, " tokens, the batch says n_tok ", batch.n_tok);
  if (capturing_) {
    // Inside a capture the positions were already copied by CudaGraphRunner::run, outside the graph.
    if (!same_batch(batch, batch_))
      fail_kind(ErrorKind::kInternal, "cuda begin_step inside a capture with a batch (", describe_batch(batch),
                ") other than the one CudaGraphRunner::run was given (", describe_batch(batch_), ")");
    return;
  }
  DeviceGuard g(device_);
  reserve_steps(n_seq);
  batch_ = batch;
  const int slot = step_slot_;
  step_slot_ = (step_slot_ + 1) % kStepSlots;
  // A slot's event that was never recorded returns at once.
  SHARDLM_CUDA_CHECK(cudaEventSynchronize(step_ev_[slot]->get()));
  StepDev* d = step_host_.as<StepDev>() + slot * step_cap_;
  for (int64_t s = 0; s < n_seq; ++s) {
    const BatchSeq& q = batch.seqs[static_cast<size_t>(s)];
    d[s] = StepDev{q.pos0, q.n_tok, q.tok0, batch.blocks(s)[0]};
  }
  SHARDLM_CUDA_CHECK(cudaMemcpyAsync(step_dev_.get(), d, static_cast<size_t>(n_seq) * sizeof(StepDev),
                                     cudaMemcpyHostToDevice, stream()));
  SHARDLM_CUDA_CHECK(cudaEventRecord(step_ev_[slot]->get(), stream()));
}

void CudaBackend::get_rows(const WeightView& table, const int32_t* ids, int64_t n_tok, float* out) {
  note_write();
  not_while_capturing("get_rows (token ids are host memory)");
  check_weight(table, "get_rows");
  if (table.packed) fail_kind(ErrorKind::kInternal, "cuda get_rows: packed weights are for matmul only");
  if (n_tok <= 0) return;
  for (int64_t t = 0; t < n_tok; ++t)
    if (ids[t] < 0 || ids[t] >= table.n_rows)
      fail("cuda get_rows: token id ", ids[t], " at ", t, " is outside [0, ", table.n_rows, ")");
  DeviceGuard g(device_);
  void* d_ids = scratch(ids_dev_, n_tok * sizeof(int32_t), "ids");
  SHARDLM_CUDA_CHECK(cudaMemcpyAsync(d_ids, ids, n_tok * sizeof(int32_t), cudaMemcpyHostToDevice, stream()));
  launch_get_rows(table.type, table.data, table.row_stride, table.n_rows, table.n_cols,
                  static_cast<const int32_t*>(d_ids), n_tok, out, stream());
}

void CudaBackend::gather_rows(const float* x, const int32_t* rows, int64_t n_rows, int64_t width, float* out) {
  note_write();
  if (n_rows < 0 || width <= 0) fail("cuda gather_rows: ", n_rows, " rows of width ", width);
  for (int64_t i = 0; i < n_rows; ++i)
    if (rows[i] < 0) fail("cuda gather_rows: row ", rows[i], " at ", i, " is negative");
  if (n_rows == 0) return;
  DeviceGuard g(device_);
  // Copies rather than a kernel: the row ids stay on the host (a captured copy bakes them, which the graph's
  // fixed batch shape allows), and a run of consecutive rows (a prompt's, or a decode batch's last tokens)
  // is one copy.
  const size_t row_bytes = static_cast<size_t>(width) * sizeof(float);
  for (int64_t i = 0; i < n_rows;) {
    int64_t j = i + 1;
    while (j < n_rows && rows[j] == rows[j - 1] + 1) ++j;
    SHARDLM_CUDA_CHECK(cudaMemcpyAsync(out + i * width, x + int64_t{rows[i]} * width,
                                       static_cast<size_t>(j - i) * row_bytes, cudaMemcpyDeviceToDevice, stream()));
    i = j;
  }
}

void CudaBackend::rms_norm(const float* x, const float* w, float* y, int64_t n_tok, int64_t n, float eps) {
  if (n <= 0) fail("cuda rms_norm: n = ", n);
  DeviceGuard g(device_);
  if ((skip_ & kSkipNorm) && n_tok == 1) return produced(y, n, xq_target(n_tok, n) != nullptr);
  produced(y, n, launch_rms_norm(x, w, y, n_tok, n, eps, stream(), xq_target(n_tok, n)));
}

int* CudaBackend::xq_target(int64_t n_tok, int64_t n) {
  if (!prequant_ || !has_packed_ || n_tok != 1 || n % 32 != 0 || n > kXqMaxCols) return nullptr;
  return xq_.as<int>();
}

void CudaBackend::produced(const float* y, int64_t n, bool quantized) {
  note_write();
  if (quantized) mark_quantized(y, n);
}

void CudaBackend::mark_quantized(const float* y, int64_t n) {
  xq_src_ = y;
  xq_cols_ = n;
  xq_seq_ = op_seq_;
}

const int* CudaBackend::xq_for(const float* x, int64_t n_cols) {
  if (xq_seq_ != op_seq_ || xq_src_ != x || xq_cols_ != n_cols) return nullptr;
  ++prequantized_;
  return xq_.as<int>();
}

void CudaBackend::matmul(const WeightView& w, const float* x, float* y, int64_t n_tok) {
  check_weight(w, "matmul");
  const int* xpre = n_tok == 1 ? xq_for(x, w.n_cols) : nullptr;
  note_write();
  matmul_impl(w, x, y, n_tok, xpre);
}

void CudaBackend::matmul_reduce(CommGroup& group, const WeightView& w, const float* x, float* y, int64_t n_tok) {
  check_weight(w, "matmul_reduce");
  // The push needs the pipelined packed kernel to run, and the fused all-reduce to follow: no skipped kinds.
  const bool can = n_tok == 1 && w.packed && uses_matvec(w, n_tok) && pk_variant_ != 1 && skip_ == 0;
  DevicePush push;
  if (!can || !group.device_push_target(y, static_cast<size_t>(w.n_rows), &push)) return matmul(w, x, y, n_tok);
  const int* xpre = xq_for(x, w.n_cols);
  note_write();
  DeviceGuard g(device_);
  ++pushing_;
  launch_matvec_packed(w.type, 1, &w.data, &w.row_stride, &w.n_rows, w.n_cols, x, &y, sm_count_, stream(), pk_variant_,
                       xpre, &push);
}

void CudaBackend::matmul_impl(const WeightView& w, const float* x, float* y, int64_t n_tok, const int* xpre) {
  if (n_tok <= 0) return;
  DeviceGuard g(device_);
  if ((skip_ & kSkipMatvec) && n_tok == 1 && w.n_rows < kSkipKeepRows) return;
  if (uses_tokens_kernel(w, n_tok)) {
    const int* xq = quantize_rows(x, n_tok, w.n_cols);
    launch_matvec_tokens(w.type, 1, &w.data, &w.row_stride, &w.n_rows, w.n_cols, xq, n_tok, &y, sm_count_, stream());
    return;
  }
  if (w.packed && uses_matvec(w, n_tok)) {
    for (int64_t t = 0; t < n_tok; ++t) {
      float* yt = y + t * w.n_rows;
      launch_matvec_packed(w.type, 1, &w.data, &w.row_stride, &w.n_rows, w.n_cols, x + t * w.n_cols, &yt, sm_count_,
                           stream(), pk_variant_, xpre);
    }
    return;
  }
  if (uses_matvec(w, n_tok)) {
    const bool generic = force_generic_ || !aligned16(x) || (w.n_cols % 4 != 0);
    for (int64_t t = 0; t < n_tok; ++t)
      launch_matvec(w.type, w.data, w.row_stride, w.n_rows, w.n_cols, x + t * w.n_cols, y + t * w.n_rows, stream(),
                    generic || !aligned16(x + t * w.n_cols));
    return;
  }
  gemm(w, x, nullptr, y, n_tok);
}

bool CudaBackend::uses_matvec(const WeightView& w, int64_t n_tok) const {
  return n_tok == 1 || (block_size(w.type) > 1 && n_tok <= kQuantMatvecMaxTok) || force_generic_;
}

bool CudaBackend::uses_tokens_kernel(const WeightView& w, int64_t n_tok) const {
  const int64_t max = tokens_max_ > 0 ? tokens_max_ : cuda_tokens_max_default(w.type);
  return w.packed && n_tok >= 2 && n_tok <= max && !force_generic_ && !(skip_ & kSkipMatvec) &&
         matvec_tokens_per_pass(w.n_cols) > 0;
}

const int* CudaBackend::quantize_rows(const float* x, int64_t n_tok, int64_t n_cols) {
  int* buf = static_cast<int*>(scratch(xrows_, quant_rows_bytes(n_tok, n_cols), "xrows"));
  launch_quantize_rows(x, n_tok, n_cols, buf, stream());
  return buf;
}

void CudaBackend::matmul_group(const WeightView* ws, int n, const float* x, float* const* ys, int64_t n_tok) {
  if (n <= 0) return;
  for (int i = 0; i < n; ++i) check_weight(ws[i], "matmul_group");
  const int* xpre = n_tok == 1 ? xq_for(x, ws[0].n_cols) : nullptr;
  note_write();
  if (n_tok <= 0) return;
  if (n_tok == 1) {
    // One launch per run of consecutive weights that share type, width and layout (all of q/k/v or gate/up
    // usually; Q4_K_M's Q6_K v after its Q4_K q/k: two).
    for (int i = 0; i < n;) {
      int j = i + 1;
      while (j < n && j - i < MvGroup::kMax && ws[j].type == ws[i].type && ws[j].n_cols == ws[i].n_cols &&
             ws[j].packed == ws[i].packed)
        ++j;
      matvec_group(ws + i, j - i, x, ys + i, ws[i].n_cols == ws[0].n_cols ? xpre : nullptr);
      i = j;
    }
    return;
  }
  bool same = true;
  for (int i = 1; i < n && same; ++i) same = ws[i].type == ws[0].type && ws[i].n_cols == ws[0].n_cols;
  if (uses_tokens_kernel(ws[0], n_tok)) {
    // x quantized once for the group; one launch per run of weights of one type and layout.
    DeviceGuard g(device_);
    const int* xq = quantize_rows(x, n_tok, ws[0].n_cols);
    for (int i = 0; i < n;) {
      int j = i + 1;
      while (j < n && j - i < MvGroup::kMax && ws[j].type == ws[i].type && ws[j].n_cols == ws[0].n_cols &&
             ws[j].packed)
        ++j;
      if (!uses_tokens_kernel(ws[i], n_tok) || ws[i].n_cols != ws[0].n_cols) {
        matmul_impl(ws[i], x, ys[i], n_tok, nullptr);
        ++i;
        continue;
      }
      const void* w[MvGroup::kMax];
      size_t stride[MvGroup::kMax];
      int64_t rows[MvGroup::kMax];
      for (int k = i; k < j; ++k) {
        w[k - i] = ws[k].data;
        stride[k - i] = ws[k].row_stride;
        rows[k - i] = ws[k].n_rows;
      }
      launch_matvec_tokens(ws[i].type, j - i, w, stride, rows, ws[i].n_cols, xq, n_tok, ys + i, sm_count_, stream());
      i = j;
    }
    return;
  }
  if (!same || uses_matvec(ws[0], n_tok) || ws[0].type == GgmlType::F32) {
    for (int i = 0; i < n; ++i) matmul_impl(ws[i], x, ys[i], n_tok, nullptr);
    return;
  }
  // Prefill: x converted to 16 bits once for the whole group.
  DeviceGuard g(device_);
  const bool bf16 = ws[0].type == GgmlType::BF16;
  void* x16 = scratch(x16_, static_cast<size_t>(n_tok * ws[0].n_cols) * 2, "x16");
  launch_f32_to_16(x, x16, n_tok * ws[0].n_cols, bf16, stream());
  for (int i = 0; i < n; ++i) gemm(ws[i], x, x16, ys[i], n_tok);
}

void CudaBackend::matvec_group(const WeightView* ws, int n, const float* x, float* const* ys, const int* xpre) {
  if (n == 1) return matmul_impl(ws[0], x, ys[0], 1, xpre);
  DeviceGuard g(device_);
  if (skip_ & kSkipMatvec) return;
  const void* w[MvGroup::kMax];
  size_t stride[MvGroup::kMax];
  int64_t rows[MvGroup::kMax];
  for (int i = 0; i < n; ++i) {
    w[i] = ws[i].data;
    stride[i] = ws[i].row_stride;
    rows[i] = ws[i].n_rows;
  }
  if (ws[0].packed) {
    launch_matvec_packed(ws[0].type, n, w, stride, rows, ws[0].n_cols, x, ys, sm_count_, stream(), pk_variant_, xpre);
    return;
  }
  if (!force_generic_ && aligned16(x) && ws[0].n_cols % 4 == 0 &&
      launch_matvec_group(ws[0].type, n, w, stride, rows, ws[0].n_cols, x, ys, stream()))
    return;
  for (int i = 0; i < n; ++i) matmul_impl(ws[i], x, ys[i], 1, xpre);
}

void CudaBackend::gemm(const WeightView& w, const float* x, const void* x16_ready, float* y, int64_t n_tok) {
  const bool quant = block_size(w.type) > 1;
  // Prefill: cuBLAS, y^T (n_rows, n_tok) = W (n_rows, n_cols) . x^T (n_cols, n_tok) in column-major terms.
  const float alpha = 1.0f, beta = 0.0f;
  const int m_all = checked_int(w.n_rows, "n_rows"), n = checked_int(n_tok, "n_tok"), k = checked_int(w.n_cols, "n_cols");
  cublasHandle_t h = cublas_->get();
  if (w.type == GgmlType::F32) {
    if (w.row_stride % 4 != 0) fail("cuda matmul: f32 row_stride ", w.row_stride, " is not a multiple of 4");
    SHARDLM_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, m_all, n, k, &alpha, w.data, CUDA_R_32F,
                                      checked_int(static_cast<int64_t>(w.row_stride / 4), "lda"), x, CUDA_R_32F, k,
                                      &beta, y, CUDA_R_32F, m_all, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return;
  }
  // 16-bit operands, fp32 accumulation: bf16 weights pair with bf16 activations, everything else with fp16.
  const bool bf16 = w.type == GgmlType::BF16;
  const cudaDataType dt = bf16 ? CUDA_R_16BF : CUDA_R_16F;
  const void* x16 = x16_ready;
  if (!x16) {
    void* buf = scratch(x16_, static_cast<size_t>(n_tok * w.n_cols) * 2, "x16");
    launch_f32_to_16(x, buf, n_tok * w.n_cols, bf16, stream());
    x16 = buf;
  }
  if (!quant) {
    if (w.row_stride % 2 != 0) fail("cuda matmul: 16-bit row_stride ", w.row_stride, " is odd");
    SHARDLM_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, m_all, n, k, &alpha, w.data, dt,
                                      checked_int(static_cast<int64_t>(w.row_stride / 2), "lda"), x16, dt, k, &beta,
                                      y, CUDA_R_32F, m_all, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return;
  }
  if (w.packed && !bf16 && n_tok <= mma_max_ && w.n_cols % 8 == 0) {
    // Dequantized tiles in shared memory and tensor-core products: no 16-bit copy of the weight.
    const size_t part = matmul_mma_scratch_floats(w.n_rows, w.n_cols, n_tok, sm_count_);
    float* sp = part > 0 ? static_cast<float*>(scratch(mma_part_, part * sizeof(float), "mma partials")) : nullptr;
    launch_matmul_mma(w.type, w.data, w.row_stride, w.n_rows, w.n_cols, x16, n_tok, y, sp, sm_count_, stream());
    return;
  }
  const int64_t chunk_rows = std::clamp<int64_t>(static_cast<int64_t>(kDequantScratch) / (2 * w.n_cols), 1, w.n_rows);
  void* w16 = scratch(w16_, static_cast<size_t>(chunk_rows * w.n_cols) * 2, "w16");
  for (int64_t r0 = 0; r0 < w.n_rows; r0 += chunk_rows) {
    const int64_t rows = std::min(chunk_rows, w.n_rows - r0);
    if (w.packed)
      launch_dequant_packed(w.type, w.data, w.row_stride, r0, rows, w.n_cols, w16, false, stream());
    else
      launch_dequant_rows(w.type, w.data, w.row_stride, r0, rows, w.n_cols, w16, false, stream());
    SHARDLM_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(rows), n, k, &alpha, w16, dt, k,
                                      x16, dt, k, &beta, y + r0, CUDA_R_32F, m_all, CUBLAS_COMPUTE_32F,
                                      CUBLAS_GEMM_DEFAULT));
  }
}

void CudaBackend::add_bias(float* y, const float* b, int64_t n_tok, int64_t n) {
  note_write();
  DeviceGuard g(device_);
  launch_add_bias(y, b, n_tok, n, stream());
}

void CudaBackend::add(float* y, const float* x, int64_t n) {
  note_write();
  DeviceGuard g(device_);
  launch_add(y, x, n, stream());
}

void CudaBackend::swiglu(const float* gate, const float* up, float* out, int64_t n) {
  DeviceGuard g(device_);
  if (skip_ & kSkipSwiglu) return produced(out, n, xq_target(1, n) != nullptr);
  // Quantized as one row of n for the down projection; a matmul uses it only for one token of width n.
  produced(out, n, launch_swiglu(gate, up, out, n, stream(), xq_target(1, n)));
}

void CudaBackend::rope(float* x, int64_t n_tok, int64_t n_heads, int64_t head_dim, float freq_base,
                       const float* freq_factors) {
  note_write();
  if (head_dim <= 0 || head_dim % 2 != 0) fail("cuda rope: head_dim ", head_dim, " must be even and positive");
  check_tokens(n_tok, "rope");
  DeviceGuard g(device_);
  const float* ff = freq_factors_on_device(freq_factors, head_dim / 2);
  for (int64_t s = 0; s < batch_.n_seq(); ++s) {
    const BatchSeq& q = batch_.seqs[static_cast<size_t>(s)];
    launch_rope(x + int64_t{q.tok0} * n_heads * head_dim, q.n_tok, n_heads, head_dim, freq_base, ff, seq_step(s),
                stream());
  }
}

void CudaBackend::kv_store(const KvLayerView& kv, const float* k, const float* v, int64_t n_tok) {
  note_write();
  check_kv(kv, n_tok, "kv_store");
  DeviceGuard g(device_);
  const int64_t row = kv.row_width();
  for (int64_t s = 0; s < batch_.n_seq(); ++s) {
    const BatchSeq& q = batch_.seqs[static_cast<size_t>(s)];
    const SeqCache c = seq_cache(kv, s);
    launch_kv_store(kv.type, c.k, c.v, kv.block_size, kv.n_head_kv, kv.head_dim, k + int64_t{q.tok0} * row,
                    v + int64_t{q.tok0} * row, q.n_tok, seq_step(s), stream());
  }
}

void CudaBackend::add_rms_norm(float* x, const float* delta, const float* w, float* y, int64_t n_tok, int64_t n,
                               float eps) {
  if (n <= 0) fail("cuda add_rms_norm: n = ", n);
  DeviceGuard g(device_);
  if ((skip_ & kSkipNorm) && n_tok == 1) return produced(y, n, xq_target(n_tok, n) != nullptr);
  produced(y, n, launch_add_rms_norm(x, delta, w, y, n_tok, n, eps, stream(), xq_target(n_tok, n)));
}

void CudaBackend::all_reduce_add_rms_norm(CommGroup& group, float* buf, float* x, const float* w, float* y,
                                          int64_t n_tok, int64_t n, float eps) {
  if (n <= 0) fail("cuda all_reduce_add_rms_norm: n = ", n);
  if (n_tok == 1 && !(skip_ & kSkipNorm)) {
    DeviceGuard g(device_);
    note_write();
    AddRmsNormEpilogue e;
    e.x = x;
    e.w = w;
    e.y = y;
    e.eps = eps;
    e.xq = xq_target(1, n);
    if (skip_ & kSkipAllReduce) return produced(y, n, e.xq != nullptr);
    if (group.all_reduce_sum_add_rms_norm(buf, static_cast<size_t>(n), e)) return produced(y, n, e.xq != nullptr);
  }
  Backend::all_reduce_add_rms_norm(group, buf, x, w, y, n_tok, n, eps);
}

void CudaBackend::check_tokens(int64_t n_tok, const char* op) const {
  if (batch_.n_seq() == 0)
    fail_kind(ErrorKind::kInternal, "cuda ", op, ": no step (call begin_step with the step's batch first)");
  if (n_tok != batch_.n_tok)
    fail_kind(ErrorKind::kInternal, "cuda ", op, ": ", n_tok, " tokens in a step of ", batch_.n_tok,
              " (begin_step's batch; the ops take all of the step's tokens)");
}

void CudaBackend::check_kv(const KvLayerView& kv, int64_t n_tok, const char* op) const {
  if (kv.head_dim <= 0 || kv.head_dim % 2 != 0)
    fail("cuda ", op, ": head_dim ", kv.head_dim, " must be even and positive");
  if (kv.type != GgmlType::F16 && kv.type != GgmlType::F32)
    fail_kind(ErrorKind::kUnsupported, "cuda ", op, ": KV type ", type_name(kv.type), " (f16 or f32 only)");
  if (kv.n_head_kv <= 0 || kv.n_blocks <= 0 || kv.block_size <= 0 || !kv.k || !kv.v)
    fail("cuda ", op, ": empty KV view (", kv.n_blocks, " blocks of ", kv.block_size, " positions, ", kv.n_head_kv,
         " KV heads)");
  check_tokens(n_tok, op);
  for (int64_t s = 0; s < batch_.n_seq(); ++s) {
    const BatchSeq& q = batch_.seqs[static_cast<size_t>(s)];
    // One block per sequence (kv_block_size answers n_ctx): its positions must all be in that block.
    if (q.ctx() > kv.block_size)
      fail("cuda ", op, ": sequence ", s, " positions [", q.pos0, ", ", q.ctx(), ") exceed its cache block of ",
           kv.block_size, " positions (this backend keeps one block of n_ctx positions per sequence)");
    const int32_t id = batch_.blocks(s)[0];
    if (id < 0 || id >= kv.n_blocks)
      fail("cuda ", op, ": sequence ", s, " cache block ", id, " is outside the pool's [0, ", kv.n_blocks, ")");
  }
}

CudaBackend::SeqCache CudaBackend::seq_cache(const KvLayerView& kv, int64_t s) const {
  // Bytes from the pool's start to block blocks(s)[0]: (block, block_size, n_head_kv, head_dim) elements.
  const size_t es = kv.type == GgmlType::F16 ? 2 : 4;
  const size_t off = static_cast<size_t>(batch_.blocks(s)[0]) * static_cast<size_t>(kv.block_size) *
                     static_cast<size_t>(kv.row_width()) * es;
  return SeqCache{static_cast<char*>(kv.k) + off, static_cast<char*>(kv.v) + off};
}

void CudaBackend::rope_kv_store(float* q, float* k, const float* v, const KvLayerView& kv, int64_t n_tok,
                                int64_t n_head, float freq_base, const float* freq_factors) {
  note_write();
  check_kv(kv, n_tok, "rope_kv_store");
  DeviceGuard g(device_);
  if ((skip_ & kSkipRope) && n_tok == 1) return;
  const float* ff = freq_factors_on_device(freq_factors, kv.head_dim / 2);
  for (int64_t s = 0; s < batch_.n_seq(); ++s) rope_kv_store_seq(q, k, v, kv, s, n_head, freq_base, ff);
}

void CudaBackend::rope_kv_store_seq(float* q, float* k, const float* v, const KvLayerView& kv, int64_t s,
                                    int64_t n_head, float freq_base, const float* ff_device) {
  const BatchSeq& sq = batch_.seqs[static_cast<size_t>(s)];
  const int64_t row = kv.row_width();
  const SeqCache c = seq_cache(kv, s);
  launch_rope_kv_store(kv.type, q + int64_t{sq.tok0} * n_head * kv.head_dim, k + int64_t{sq.tok0} * row,
                       v + int64_t{sq.tok0} * row, c.k, c.v, kv.block_size, sq.n_tok, n_head, kv.n_head_kv, kv.head_dim,
                       freq_base, ff_device, seq_step(s), stream());
}

void CudaBackend::rope_attention(float* q, float* k, const float* v, const KvLayerView& kv, int64_t n_tok,
                                 int64_t n_head, float freq_base, const float* freq_factors, float* out) {
  bool fused = false;  // some sequence of the batch takes the fused decode kernel
  for (const BatchSeq& sq : batch_.seqs) fused = fused || uses_decode_attention(kv, sq.n_tok, n_head);
  if (!fuse_rope_ || !fused) return Backend::rope_attention(q, k, v, kv, n_tok, n_head, freq_base, freq_factors, out);
  note_write();
  check_kv(kv, n_tok, "rope_attention");
  DeviceGuard g(device_);
  const float* ff = freq_factors_on_device(freq_factors, kv.head_dim / 2);
  // Every decode sequence in one launch of the decode kernel, any other by rope_kv_store's kernel and then
  // attention's (the sequences' rows and cache blocks are disjoint, so the order between them is free).
  attention_decode(q, kv, n_head, out, k, v, freq_base, ff);
  for (int64_t s = 0; s < batch_.n_seq(); ++s) {
    if (uses_decode_attention(kv, batch_.seqs[static_cast<size_t>(s)].n_tok, n_head)) continue;
    rope_kv_store_seq(q, k, v, kv, s, n_head, freq_base, ff);
    attention_seq(q, kv, s, n_head, out);
  }
}

bool CudaBackend::uses_decode_attention(const KvLayerView& kv, int64_t n_tok, int64_t n_head) const {
  return n_tok == 1 && !force_generic_attn_ && kv.n_head_kv > 0 && n_head % kv.n_head_kv == 0 &&
         attention_decode_supported(kv.head_dim, n_head / kv.n_head_kv);
}

void CudaBackend::attention(const float* q, const KvLayerView& kv, int64_t n_tok, int64_t n_head, float* out) {
  note_write();
  check_kv(kv, n_tok, "attention");
  DeviceGuard g(device_);
  attention_decode(q, kv, n_head, out, nullptr, nullptr, 0.0f, nullptr);
  for (int64_t s = 0; s < batch_.n_seq(); ++s)
    if (!uses_decode_attention(kv, batch_.seqs[static_cast<size_t>(s)].n_tok, n_head)) attention_seq(q, kv, s, n_head, out);
}

void CudaBackend::attention_decode(const float* q, const KvLayerView& kv, int64_t n_head, float* out,
                                   const float* k_new, const float* v_new, float freq_base, const float* ff_device) {
  if (kv.n_head_kv <= 0 || n_head % kv.n_head_kv != 0)
    fail("cuda attention: n_head ", n_head, " is not a multiple of n_head_kv ", kv.n_head_kv);
  bool any = false;
  for (const BatchSeq& sq : batch_.seqs) any = any || uses_decode_attention(kv, sq.n_tok, n_head);
  if (!any) return;
  const int64_t qrow = n_head * kv.head_dim, n_seq = batch_.n_seq();
  // The output is quantized for the o projection only when it is the step's one row (a one-token matvec).
  const bool one_row = batch_.n_tok == 1;
  if (skip_ & kSkipAttn) {
    if (one_row && xq_target(1, qrow)) mark_quantized(out, qrow);
    return;
  }
  const int n_split = attention_decode_splits(kv.block_size, kv.n_head_kv, sm_count_);
  auto* part = static_cast<float*>(scratch(
      attn_part_, static_cast<size_t>(n_seq * n_head) * n_split * (kv.head_dim + 2) * sizeof(float), "attention"));
  // Default: about 8 block columns (4 per KV head at 2 local KV heads, 1 at 8), because at long contexts
  // more columns than that cost more than they give (8B after a 3,000-token prompt: 4 per KV head slower than
  // 1 on one GPU's 8 KV heads, faster at tp 4's 2; docs/BENCHMARKS.md, Decisions in the source).
  const int64_t want = attn_qsplit_ > 0 ? attn_qsplit_ : std::clamp<int64_t>(8 / kv.n_head_kv, 1, 4);
  const int qsplit = static_cast<int>(std::min<int64_t>(want, n_head / kv.n_head_kv));  // powers of two
  int* done = attn_last_block_combine_ ? attention_counters(n_seq * kv.n_head_kv * qsplit) : nullptr;
  // The pool's base: each sequence's block comes from its StepDev.
  const bool quantized =
      launch_attention_decode(kv.type, q, kv.k, kv.v, kv.block_size, kv.n_head_kv, kv.head_dim, n_head, n_split, part,
                              out, seq_step(0), n_seq, stream(), one_row ? xq_target(1, qrow) : nullptr, k_new, v_new,
                              freq_base, ff_device, attn_out4_, qsplit, done);
  if (quantized) mark_quantized(out, qrow);  // note_write() came first
}

void CudaBackend::attention_seq(const float* q, const KvLayerView& kv, int64_t s, int64_t n_head, float* out) {
  if (kv.n_head_kv <= 0 || n_head % kv.n_head_kv != 0)
    fail("cuda attention: n_head ", n_head, " is not a multiple of n_head_kv ", kv.n_head_kv);
  const BatchSeq& sq = batch_.seqs[static_cast<size_t>(s)];
  const int64_t n_tok = sq.n_tok;
  // This sequence's rows of the step, its StepDev and its cache block.
  const int64_t qrow = n_head * kv.head_dim;
  q += int64_t{sq.tok0} * qrow;
  out += int64_t{sq.tok0} * qrow;
  const SeqCache c = seq_cache(kv, s);
  const StepDev* sd = seq_step(s);
  if (kv.head_dim > 256)
    fail_kind(ErrorKind::kUnsupported, "cuda attention: head_dim ", kv.head_dim, " > 256 is not implemented");
  if (n_tok > 1 && !force_generic_attn_ &&
      launch_attention_prefill(kv.type, q, c.k, c.v, kv.block_size, kv.n_head_kv, kv.head_dim, n_tok, n_head, out, sd,
                               sm_count_, stream()))
    return;
  launch_attention_generic(kv.type, q, c.k, c.v, kv.block_size, kv.n_head_kv, kv.head_dim, n_tok, n_head, out, sd,
                           stream());
}

void CudaBackend::begin_capture() {
  if (capturing_) fail_kind(ErrorKind::kInternal, "cuda: nested graph capture");
  DeviceGuard g(device_);
  // Relaxed: other threads may keep using CUDA (e.g. another rank's backend) while this stream captures.
  SHARDLM_CUDA_CHECK(cudaStreamBeginCapture(stream(), cudaStreamCaptureModeRelaxed));
  capturing_ = true;
}

cudaGraph_t CudaBackend::end_capture() {
  DeviceGuard g(device_);
  capturing_ = false;
  cudaGraph_t graph = nullptr;
  const cudaError_t e = cudaStreamEndCapture(stream(), &graph);
  if (e != cudaSuccess) {
    if (graph) cudaGraphDestroy(graph);
    throw_cuda(e, "cudaStreamEndCapture", __FILE__, __LINE__);
  }
  return graph;
}

int32_t CudaBackend::argmax(const float* logits, int64_t n) {
  not_while_capturing("argmax (waits for the result)");
  if (n <= 0) fail("cuda argmax: n = ", n);
  DeviceGuard g(device_);
  launch_argmax(logits, n, argmax_dev_.as<int32_t>(), argmax_key_.as<unsigned long long>(), stream());
  SHARDLM_CUDA_CHECK(cudaMemcpyAsync(argmax_host_.as<int32_t>(), argmax_dev_.get(), sizeof(int32_t),
                                     cudaMemcpyDeviceToHost, stream()));
  SHARDLM_CUDA_CHECK(cudaStreamSynchronize(stream()));
  return *argmax_host_.as<int32_t>();
}

void CudaBackend::top_candidates(const float* logits, int64_t n, const std::vector<CandidateQuery>& rows,
                                 std::vector<CandidateAnswer>& out) {
  not_while_capturing("top_candidates (waits for the result)");
  out.clear();
  if (rows.empty()) return;
  const int64_t n_rows = static_cast<int64_t>(rows.size());
  if (n < 1 || n > INT32_MAX || n_rows * n > INT32_MAX)
    fail_kind(ErrorKind::kInternal, "cuda top_candidates: ", n_rows, " rows of ", n);
  bool host_rank = false;  // some row wants more candidates than one sorting block keeps
  size_t n_keys = 0, n_extra = 0;
  for (const CandidateQuery& q : rows) {
    if (q.k < 1) fail_kind(ErrorKind::kInternal, "cuda top_candidates: k = ", q.k);
    for (int32_t e : q.extra)
      if (e < 0 || e >= n) fail_kind(ErrorKind::kInternal, "cuda top_candidates: extra id ", e, " of ", n);
    const int kk = static_cast<int>(std::min<int64_t>(q.k, n));
    host_rank = host_rank || kk > kTopMaxK;
    n_keys += static_cast<size_t>(kk);
    n_extra += q.extra.size();
  }
  // Ranked on the host from the downloaded rows.
  if (host_rank) return Backend::top_candidates(logits, n, rows, out);
  DeviceGuard g(device_);
  const auto grow = [](DevMem& m, size_t bytes) {
    if (m.size() < bytes) m = DevMem(bytes);
  };
  // Pinned host side: every row's keys, then every extra value (rows in order).
  const size_t key_bytes = n_keys * sizeof(unsigned long long), host_bytes = key_bytes + n_extra * sizeof(float);
  if (topk_host_bytes_ < host_bytes) {
    topk_host_ = PinnedMem(host_bytes);
    topk_host_bytes_ = host_bytes;
  }
  auto* host = topk_host_.as<unsigned char>();
  // Each row's kernels and its download are queued one after the other on the stream, so the next row may
  // reuse the scratch keys; the one wait is at the end. Greedy steps (k = 1 everywhere): one launch, one copy.
  const bool one_launch = n_rows <= 65535 &&
                          std::all_of(rows.begin(), rows.end(), [](const CandidateQuery& q) { return q.k == 1; });
  if (one_launch) {
    grow(topk_a_, key_bytes);
    launch_argmax_keys(logits, n, n_rows, topk_a_.as<unsigned long long>(), stream());
    SHARDLM_CUDA_CHECK(cudaMemcpyAsync(host, topk_a_.get(), key_bytes, cudaMemcpyDeviceToHost, stream()));
  }
  size_t at = 0;
  for (int64_t r = 0; r < n_rows && !one_launch; ++r) {
    const float* row = logits + r * n;
    const int kk = static_cast<int>(std::min<int64_t>(rows[static_cast<size_t>(r)].k, n));
    const unsigned long long* keys = nullptr;
    if (kk == 1) {
      launch_argmax_key(row, n, argmax_key_.as<unsigned long long>(), stream());
      keys = argmax_key_.as<unsigned long long>();
    } else {
      const size_t scratch_bytes = static_cast<size_t>(topk_scratch_keys(n, kk)) * sizeof(unsigned long long);
      grow(topk_a_, scratch_bytes);
      grow(topk_b_, scratch_bytes);
      keys = launch_topk(row, n, kk, topk_a_.as<unsigned long long>(), topk_b_.as<unsigned long long>(), stream());
    }
    SHARDLM_CUDA_CHECK(cudaMemcpyAsync(host + at, keys, static_cast<size_t>(kk) * sizeof(unsigned long long),
                                       cudaMemcpyDeviceToHost, stream()));
    at += static_cast<size_t>(kk) * sizeof(unsigned long long);
  }
  if (n_extra > 0) {
    // One gather for all rows: ids as offsets into the whole (n_rows, n) block (below 2^31, checked above).
    std::vector<int32_t> ids;
    ids.reserve(n_extra);
    for (int64_t r = 0; r < n_rows; ++r)
      for (int32_t e : rows[static_cast<size_t>(r)].extra) ids.push_back(static_cast<int32_t>(r * n + e));
    grow(extra_ids_, n_extra * sizeof(int32_t));
    grow(extra_vals_, n_extra * sizeof(float));
    SHARDLM_CUDA_CHECK(cudaMemcpyAsync(extra_ids_.get(), ids.data(), n_extra * sizeof(int32_t), cudaMemcpyHostToDevice,
                                       stream()));
    launch_gather_f32(logits, extra_ids_.as<int32_t>(), static_cast<int>(n_extra), extra_vals_.as<float>(), stream());
    SHARDLM_CUDA_CHECK(cudaMemcpyAsync(host + key_bytes, extra_vals_.get(), n_extra * sizeof(float),
                                       cudaMemcpyDeviceToHost, stream()));
  }
  SHARDLM_CUDA_CHECK(cudaStreamSynchronize(stream()));
  out.assign(rows.size(), CandidateAnswer{});
  at = 0;
  size_t ex = 0;
  for (size_t r = 0; r < rows.size(); ++r) {
    const int kk = static_cast<int>(std::min<int64_t>(rows[r].k, n));
    out[r].top.resize(static_cast<size_t>(kk));
    for (int i = 0; i < kk; ++i) {
      unsigned long long key;
      std::memcpy(&key, host + at, sizeof key);
      at += sizeof key;
      out[r].top[static_cast<size_t>(i)] = candidate_from_key(key);
    }
    out[r].extra_values.resize(rows[r].extra.size());
    if (!rows[r].extra.empty())
      std::memcpy(out[r].extra_values.data(), host + key_bytes + ex * sizeof(float), rows[r].extra.size() * sizeof(float));
    ex += rows[r].extra.size();
  }
}

void CudaBackend::set_device_token(int32_t id) {
  not_while_capturing("set_device_token");
  if (id < 0) fail("cuda set_device_token: token id ", id, " is negative");
  DeviceGuard g(device_);
  note_write();
  // Pageable source: staged before the call returns; stream order puts it after the steps enqueued so far.
  SHARDLM_CUDA_CHECK(cudaMemcpyAsync(tok_dev_.get(), &id, sizeof id, cudaMemcpyHostToDevice, stream()));
}

void CudaBackend::get_rows_device_token(const WeightView& table, float* out) {
  note_write();
  check_weight(table, "get_rows_device_token");
  if (table.packed) fail_kind(ErrorKind::kInternal, "cuda get_rows_device_token: packed weights are for matmul only");
  DeviceGuard g(device_);
  // The token is always in [0, n_rows): set_device_token's caller checked it, greedy_pick writes 0 where it
  // found no candidate.
  launch_get_rows(table.type, table.data, table.row_stride, table.n_rows, table.n_cols, tok_dev_.as<int32_t>(), 1,
                  out, stream());
}

void CudaBackend::greedy_candidate(const float* logits, int64_t n, int64_t id_offset, float* cands, int slot,
                                   int n_slots) {
  if (n < 1 || n > INT32_MAX || id_offset < 0 || n + id_offset > (int64_t{1} << 24) || slot < 0 || slot >= n_slots)
    fail_kind(ErrorKind::kInternal, "cuda greedy_candidate: n = ", n, ", id offset ", id_offset, ", slot ", slot, " of ",
              n_slots, " (ids must stay below 2^24 to travel as floats)");
  note_write();
  DeviceGuard g(device_);
  launch_greedy_candidate(logits, n, id_offset, argmax_key_.as<unsigned long long>(), cands, slot, n_slots, stream());
}

void CudaBackend::greedy_pick(const float* cands, int n_slots) {
  if (n_slots < 1) fail_kind(ErrorKind::kInternal, "cuda greedy_pick: ", n_slots, " slots");
  // The kernel files the token under the step's position (the first StepDev's pos0): one sequence per step.
  if (batch_.n_seq() != 1)
    fail_kind(ErrorKind::kInternal, "cuda greedy_pick: the device token is for steps of one sequence; this step has ",
              batch_.n_seq());
  note_write();
  DeviceGuard g(device_);
  launch_greedy_pick(cands, n_slots, tok_dev_.as<int32_t>(), tok_host_.as<int32_t>(), seq_step(0), stream());
}

void CudaBackend::mark_device_token(int64_t pos) {
  not_while_capturing("mark_device_token");
  if (pos < 0) fail_kind(ErrorKind::kInternal, "cuda mark_device_token: position ", pos);
  DeviceGuard g(device_);
  SHARDLM_CUDA_CHECK(cudaEventRecord(tok_ev_[pos & 1]->get(), stream()));
  tok_marked_[pos & 1] = pos;
}

int32_t CudaBackend::device_token_at(int64_t pos) {
  if (pos < 0 || tok_marked_[pos & 1] != pos)
    fail_kind(ErrorKind::kInternal, "cuda device_token_at: the step at position ", pos, " was not the last one marked "
              "at its parity (", pos < 0 ? -1 : tok_marked_[pos & 1], ")");
  DeviceGuard g(device_);
  SHARDLM_CUDA_CHECK(cudaEventSynchronize(tok_ev_[pos & 1]->get()));
  return static_cast<volatile int32_t*>(tok_host_.as<int32_t>())[pos & 1];
}

void CudaBackend::argmax_async(const float* logits, int64_t n, int32_t* out) {
  if (n <= 0) fail("cuda argmax: n = ", n);
  DeviceGuard g(device_);
  launch_argmax(logits, n, out, argmax_key_.as<unsigned long long>(), stream());
}

}  // namespace cuda_detail

// ---- public API ---------------------------------------------------------------------------------------

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  return n;
}

double cuda_copy_bandwidth(int device_index) {
  if (device_index < 0 || device_index >= cuda_device_count())
    fail("CUDA device ", device_index, " is outside [0, ", cuda_device_count(), ")");
  SHARDLM_CUDA_CHECK(cudaSetDevice(device_index));
  const size_t n = size_t(1) << 30;
  void* a = nullptr;
  void* b = nullptr;
  SHARDLM_CUDA_CHECK(cudaMalloc(&a, n));
  SHARDLM_CUDA_CHECK(cudaMalloc(&b, n));
  SHARDLM_CUDA_CHECK(cudaMemset(a, 1, n));
  cudaEvent_t e0, e1;
  SHARDLM_CUDA_CHECK(cudaEventCreate(&e0));
  SHARDLM_CUDA_CHECK(cudaEventCreate(&e1));
  float best_ms = 1e30f;
  for (int rep = 0; rep < 6; ++rep) {  // the first is a warm-up; the best of the rest is the ceiling
    SHARDLM_CUDA_CHECK(cudaEventRecord(e0));
    SHARDLM_CUDA_CHECK(cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice));
    SHARDLM_CUDA_CHECK(cudaEventRecord(e1));
    SHARDLM_CUDA_CHECK(cudaEventSynchronize(e1));
    float ms = 0;
    SHARDLM_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
    if (rep > 0) best_ms = std::min(best_ms, ms);
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  cudaFree(a);
  cudaFree(b);
  return 2.0 * double(n) / (double(best_ms) * 1e-3);  // bytes read plus bytes written
}

std::unique_ptr<Backend> make_cuda_backend(int device_index, GgmlType kv_type, const CudaTuning& tuning) {
  return std::make_unique<cuda_detail::CudaBackend>(device_index, kv_type, tuning);
}

void* cuda_stream(Backend& backend) { return cuda_detail::as_cuda(backend, "cuda_stream").stream(); }

void cuda_set_attention_out4(Backend& backend, bool on) {
  cuda_detail::as_cuda(backend, "cuda_set_attention_out4").set_attention_out4(on);
}

int64_t cuda_tokens_max_default(GgmlType type) {
  // The crossover with dequantize-then-cuBLAS, measured end to end (8B, 4 to 64 sequences decoding on an
  // H100; docs/BENCHMARKS.md, Decisions in the source): Q4_0 faster at 32 tokens, slower at 64; the Q4_K_M
  // file (Q4_K and Q6_K) faster at 16, slower at 32. Q8_0 and the rest take the lower, unmeasured.
  return type == GgmlType::Q4_0 ? 32 : 16;
}

void cuda_set_tokens_max(Backend& backend, int64_t n) {
  if (n < 0) fail("cuda_set_tokens_max: ", n, " is negative");
  cuda_detail::as_cuda(backend, "cuda_set_tokens_max").set_tokens_max(n);
}

void cuda_set_attention_last_block_combine(Backend& backend, bool on) {
  cuda_detail::as_cuda(backend, "cuda_set_attention_last_block_combine").set_attention_last_block_combine(on);
}

void cuda_set_attention_blocks_per_kv_head(Backend& backend, int blocks) {
  if (blocks != 1 && blocks != 2 && blocks != 4) fail("cuda_set_attention_blocks_per_kv_head: ", blocks, " is not 1, 2 or 4");
  cuda_detail::as_cuda(backend, "cuda_set_attention_blocks_per_kv_head").set_attention_qsplit(blocks);
}

int64_t cuda_pushing_matvecs(Backend& backend) {
  return cuda_detail::as_cuda(backend, "cuda_pushing_matvecs").pushing_matvecs();
}
int64_t cuda_prequantized_matvecs(Backend& backend) {
  return cuda_detail::as_cuda(backend, "cuda_prequantized_matvecs").prequantized_matvecs();
}

int32_t cuda_argmax(Backend& backend, const float* logits, int64_t n) {
  return cuda_detail::as_cuda(backend, "cuda_argmax").argmax(logits, n);
}

void cuda_argmax_async(Backend& backend, const float* logits, int64_t n, int32_t* out) {
  cuda_detail::as_cuda(backend, "cuda_argmax_async").argmax_async(logits, n, out);
}

// CudaTuning::graph_timing (SHARDLM_GRAPH_TIMING=1, measurement only): events before and after each replay, so that the teardown can
// say how much of a decode step's period the graph's own GPU time is; the rest is the time between graphs
// (the candidates' kernel and copy, the host's exchange and sampling, the next launch).
struct GraphTiming {
  cuda_detail::Event start[2], end[2];     // made on the runner's device (the constructor's caller sets it)
  int64_t n = 0;                           // replays timed
  std::vector<float> graph_ms, period_ms;  // start -> end; one replay's start -> the next one's start
  GraphTiming() = default;
  ~GraphTiming() {
    // Medians: a generation's first step follows a prefill and the host's set-up, not a decode step.
    const auto median = [](std::vector<float> v) {
      std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(v.size() / 2), v.end());
      return 1e3 * static_cast<double>(v[v.size() / 2]);
    };
    if (!graph_ms.empty() && !period_ms.empty())
      std::fprintf(stderr, "shardlm: graph timing (medians of %zu): graph %.1f us on the GPU, %.1f us from one start to the next\n",
                   period_ms.size(), median(graph_ms), median(period_ms));
  }
  GraphTiming(const GraphTiming&) = delete;
  GraphTiming& operator=(const GraphTiming&) = delete;
  // Around one replay: the previous replay's events are complete by now only if the host synced since
  // (decode does, to read the token); otherwise this waits for them.
  void before(cudaStream_t s) {
    const int cur = static_cast<int>(n % 2), prev = 1 - cur;
    if (n > 0) {
      float ms = 0.0f;
      SHARDLM_CUDA_CHECK(cudaEventSynchronize(end[prev].get()));
      SHARDLM_CUDA_CHECK(cudaEventElapsedTime(&ms, start[prev].get(), end[prev].get()));
      graph_ms.push_back(ms);
    }
    SHARDLM_CUDA_CHECK(cudaEventRecord(start[cur].get(), s));
  }
  void after(cudaStream_t s) {
    const int cur = static_cast<int>(n % 2), prev = 1 - cur;
    SHARDLM_CUDA_CHECK(cudaEventRecord(end[cur].get(), s));
    if (n > 0) {
      float ms = 0.0f;
      SHARDLM_CUDA_CHECK(cudaEventSynchronize(start[cur].get()));
      SHARDLM_CUDA_CHECK(cudaEventElapsedTime(&ms, start[prev].get(), start[cur].get()));
      period_ms.push_back(ms);
    }
    ++n;
  }
};

// What a captured graph bakes in beyond the backend's scratch buffers: the launch shapes (the step's tokens
// and each sequence's share) and each sequence's cache block (the KV base pointers). Positions are not part
// of it: they travel in StepDev.
struct GraphShape {
  int64_t n_tok = -1;
  std::vector<std::pair<int32_t, int32_t>> seqs;  // (n_seq) each sequence's (n_tok, first block id)
  int64_t gen = -1;                               // the backend's scratch generation
  static GraphShape of(const BatchInfo& batch, int64_t gen) {
    GraphShape g;
    g.n_tok = batch.n_tok;
    for (int64_t s = 0; s < batch.n_seq(); ++s)
      g.seqs.emplace_back(batch.seqs[static_cast<size_t>(s)].n_tok, batch.blocks(s)[0]);
    g.gen = gen;
    return g;
  }
  bool operator==(const GraphShape&) const = default;
};

struct CudaGraphRunner::Impl {
  cuda_detail::CudaBackend* backend = nullptr;
  cuda_detail::Graph graph;
  GraphShape graph_shape;  // shape the graph was captured for
  GraphShape warm_shape;   // shape of the last eager run
  int64_t captures = 0, replays = 0;
  std::unique_ptr<GraphTiming> timing;  // CudaTuning::graph_timing
};

CudaGraphRunner::CudaGraphRunner(Backend& backend) : impl_(std::make_unique<Impl>()) {
  impl_->backend = &cuda_detail::as_cuda(backend, "CudaGraphRunner");
  if (impl_->backend->graph_timing()) {
    cuda_detail::DeviceGuard g(impl_->backend->device_index());
    impl_->timing = std::make_unique<GraphTiming>();
  }
}

CudaGraphRunner::~CudaGraphRunner() = default;

void CudaGraphRunner::run(const BatchInfo& batch, const std::function<void()>& body) {
  Impl& s = *impl_;
  cuda_detail::CudaBackend& b = *s.backend;
  b.begin_step(batch);  // positions travel outside the graph (and step_dev_ may grow: a new generation)
  const GraphShape shape = GraphShape::of(batch, b.scratch_generation());
  const bool timed = s.timing && batch.n_tok == 1;
  if (s.graph.valid() && s.graph_shape == shape) {
    cuda_detail::DeviceGuard g(b.device_index());
    if (timed) s.timing->before(b.stream());
    SHARDLM_CUDA_CHECK(cudaGraphLaunch(s.graph.exec(), b.stream()));
    if (timed) s.timing->after(b.stream());
    ++s.replays;
    return;
  }
  s.graph.reset();
  if (s.warm_shape != shape) {
    body();  // eager: sizes scratch buffers, uploads tables, warms cuBLAS
    s.warm_shape = GraphShape::of(batch, b.scratch_generation());
    return;
  }
  b.begin_capture();
  try {
    body();
  } catch (...) {
    cudaGraph_t g = nullptr;
    try {
      g = b.end_capture();
    } catch (...) {
    }
    if (g) cudaGraphDestroy(g);
    throw;
  }
  s.graph.adopt(b.end_capture());
  s.graph_shape = GraphShape::of(batch, b.scratch_generation());
  ++s.captures;
  cuda_detail::DeviceGuard g(b.device_index());
  SHARDLM_CUDA_CHECK(cudaGraphLaunch(s.graph.exec(), b.stream()));
  ++s.replays;
}

void CudaGraphRunner::invalidate() {
  impl_->graph.reset();
  impl_->warm_shape = GraphShape{};
}

bool CudaGraphRunner::captured() const { return impl_->graph.valid(); }
int64_t CudaGraphRunner::captures() const { return impl_->captures; }
int64_t CudaGraphRunner::replays() const { return impl_->replays; }

}  // namespace shardlm
