// The CUDA backend class. Private to src/backends/cuda (the bench tool uses it to reach the stream).
#pragma once

#include <atomic>
#include <memory>
#include <vector>

#include "backends/cuda/cuda_backend.h"
#include "backends/cuda/cuda_util.cuh"
#include "backends/cuda/kernels.cuh"

namespace shardlm::cuda_detail {

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, GgmlType kv_type, const CudaTuning& tuning);
  ~CudaBackend() override;

  std::string name() const override;
  DeviceKind device() const override { return DeviceKind::kCuda; }
  bool supports(GgmlType weight_type) const override;

  std::unique_ptr<DeviceBuffer> alloc(size_t bytes) override;
  void upload(void* dst, const void* host_src, size_t bytes) override;
  void download(void* host_dst, const void* src, size_t bytes) override;
  void synchronize() override;
  size_t allocated_bytes() const override;
  // Q8_0/Q4_0/Q4_K/Q6_K matmul weights go to the packed layout (pack.h) unless packing is off.
  WeightView place_matmul_weight(const WeightView& host, std::vector<std::unique_ptr<DeviceBuffer>>& storage) override;

  // Keeps a host copy of the batch and writes each sequence's StepDev to device memory (one async copy from
  // a pinned slot). Inside a graph capture it only checks that the batch is the one CudaGraphRunner::run set.
  void begin_step(const BatchInfo& batch) override;
  // One block per sequence: the kernels read a sequence's cache as one contiguous range of n_ctx positions
  // (paged kernels come later), so a pool for this backend holds whole-context blocks.
  int64_t kv_block_size(int64_t n_ctx) const override { return n_ctx; }

  void get_rows(const WeightView& table, const int32_t* ids, int64_t n_tok, float* out) override;
  // Device-to-device copies on the stream, one per run of consecutive rows (capturable; a graph bakes the rows).
  // out must not overlap the rows it gathers (they are copied as memcpy would).
  void gather_rows(const float* x, const int32_t* rows, int64_t n_rows, int64_t width, float* out) override;
  void rms_norm(const float* x, const float* w, float* y, int64_t n_tok, int64_t n, float eps) override;
  void matmul(const WeightView& w, const float* x, float* y, int64_t n_tok) override;
  // n_tok == 1: one launch for the whole group (same type and width, fast-path layouts); prefill: x is
  // converted to 16 bits once for the group.
  void matmul_group(const WeightView* ws, int n, const float* x, float* const* ys, int64_t n_tok) override;
  void add_bias(float* y, const float* b, int64_t n_tok, int64_t n) override;
  void add(float* y, const float* x, int64_t n) override;
  void swiglu(const float* gate, const float* up, float* out, int64_t n) override;
  void matmul_reduce(CommGroup& group, const WeightView& w, const float* x, float* y, int64_t n_tok) override;
  void rope(float* x, int64_t n_tok, int64_t n_heads, int64_t head_dim, float freq_base,
            const float* freq_factors) override;
  void kv_store(const KvLayerView& kv, const float* k, const float* v, int64_t n_tok) override;
  void add_rms_norm(float* x, const float* delta, const float* w, float* y, int64_t n_tok, int64_t n,
                    float eps) override;
  void all_reduce_add_rms_norm(CommGroup& group, float* buf, float* x, const float* w, float* y, int64_t n_tok,
                               int64_t n, float eps) override;
  void rope_kv_store(float* q, float* k, const float* v, const KvLayerView& kv, int64_t n_tok, int64_t n_head,
                     float freq_base, const float* freq_factors) override;
  void attention(const float* q, const KvLayerView& kv, int64_t n_tok, int64_t n_head, float* out) override;
  // A sequence of one token (the flash-decoding kernel's shapes): one kernel rotates q and k, stores the new
  // rows and attends (plus the combine), instead of rope_kv_store's kernel before it. Other sequences of the
  // batch take rope_kv_store's kernel and the attention kernels.
  void rope_attention(float* q, float* k, const float* v, const KvLayerView& kv, int64_t n_tok, int64_t n_head,
                      float freq_base, const float* freq_factors, float* out) override;
  void top_candidates(const float* logits, int64_t n, const std::vector<CandidateQuery>& rows,
                      std::vector<CandidateAnswer>& out) override;
  bool device_tokens() const override { return true; }
  void set_device_token(int32_t id) override;
  void get_rows_device_token(const WeightView& table, float* out) override;
  void greedy_candidate(const float* logits, int64_t n, int64_t id_offset, float* cands, int slot,
                        int n_slots) override;
  void greedy_pick(const float* cands, int n_slots) override;
  void mark_device_token(int64_t pos) override;
  int32_t device_token_at(int64_t pos) override;

  // ---- CUDA-only surface (CudaGraphRunner, cuda_argmax, bench, tests) ----
  int device_index() const { return device_; }
  cudaStream_t stream() const { return stream_->get(); }
  bool capturing() const { return capturing_; }
  void begin_capture();
  cudaGraph_t end_capture();           // returns the captured graph (caller owns it), even on error paths
  int64_t scratch_generation() const { return scratch_gen_; }
  int32_t argmax(const float* logits, int64_t n);
  int64_t prequantized_matvecs() const { return prequantized_; }
  int64_t pushing_matvecs() const { return pushing_; }
  void set_attention_out4(bool on) { attn_out4_ = on; }
  void set_attention_qsplit(int blocks) { attn_qsplit_ = blocks; }
  void set_attention_last_block_combine(bool on) { attn_last_block_combine_ = on; }
  void argmax_async(const float* logits, int64_t n, int32_t* out);
  // Forces the element-by-element matvec (tests compare it with the fast kernels).
  void set_force_generic_matvec(bool on) { force_generic_ = on; }
  void set_tokens_max(int64_t n) { tokens_max_ = n; }
  // Whether place_matmul_weight packs (default on; SHARDLM_CUDA_PACK=0 turns it off at construction).
  void set_pack_weights(bool on) { pack_weights_ = on; }
  bool graph_timing() const { return graph_timing_; }
  // Forces the generic attention kernel for n_tok == 1 too.
  void set_force_generic_attention(bool on) { force_generic_attn_ = on; }

 private:
  // A device buffer that only grows; growing bumps scratch_gen_ so that graphs holding the old address
  // are captured again. Growth is refused while capturing.
  void* scratch(DevMem& buf, size_t bytes, const char* what);
  const float* freq_factors_on_device(const float* host, int64_t n);
  int* attention_counters(int64_t n);  // attn_done_ with at least n zeroed counters
  bool uses_matvec(const WeightView& w, int64_t n_tok) const;  // matvec per token rather than cuBLAS
  // Whether n_tok >= 2 tokens times packed weights take the several-token kernel (launch_matvec_tokens):
  // each weight read once per pass, every token's outputs the bits of its one-token matvec.
  bool uses_tokens_kernel(const WeightView& w, int64_t n_tok) const;
  // x's n_tok rows quantized once into xrows_ for the several-token kernel (all weights of a group share it).
  const int* quantize_rows(const float* x, int64_t n_tok, int64_t n_cols);
  void matmul_impl(const WeightView& w, const float* x, float* y, int64_t n_tok, const int* xpre);
  // One token, n <= MvGroup::kMax (4) weights of one type, width and layout: one launch where a kernel allows.
  void matvec_group(const WeightView* ws, int n, const float* x, float* const* ys, const int* xpre);
  // Activations quantized where they are produced (quant_x.cuh): rms_norm, add_rms_norm and swiglu write
  // the int8 row next to their float output when packed weights may read it; the next op, if it is a
  // matmul of that very row, passes it to the packed matvec instead of letting every block quantize x.
  // op_seq_ counts ops; the copy is valid only for the op right after its producer.
  int* xq_target(int64_t n_tok, int64_t n);                       // where to write, or null
  void produced(const float* y, int64_t n, bool quantized);       // after a producer's launch
  void mark_quantized(const float* y, int64_t n);                 // xq_ holds y's row as of this op
  // Whether a sequence of n_tok tokens takes the flash-decoding kernel (one token, its head_dim and group
  // sizes): also the condition for rope_attention's fused form, which only that kernel has.
  bool uses_decode_attention(const KvLayerView& kv, int64_t n_tok, int64_t n_head) const;
  // Checks shared by kv_store, rope_kv_store, attention and rope_attention: the KV view, n_tok against the
  // batch, and every sequence inside its one cache block.
  void check_kv(const KvLayerView& kv, int64_t n_tok, const char* op) const;
  // n_tok is the batch's (the ops take the step's tokens, grouped by sequence).
  void check_tokens(int64_t n_tok, const char* op) const;
  // ---- one sequence of the batch (batch_.seqs[s]) ----
  // Decode attention runs every decoding sequence of a step in one launch (each block reads its sequence's
  // StepDev); the other kernels of the KV path launch once per sequence (one StepDev, one contiguous cache
  // range each).
  const StepDev* seq_step(int64_t s) const { return step_dev_.as<StepDev>() + s; }  // its StepDev (device)
  // Its cache range in the pool: the K and V rows of block blocks(s)[0], (block_size, n_head_kv, head_dim).
  struct SeqCache {
    void* k;
    void* v;
  };
  SeqCache seq_cache(const KvLayerView& kv, int64_t s) const;
  // rope_kv_store's kernel for sequence s (q, k, v are the step's, offset here by the sequence's tok0).
  void rope_kv_store_seq(float* q, float* k, const float* v, const KvLayerView& kv, int64_t s, int64_t n_head,
                         float freq_base, const float* ff_device);
  // Attention of sequence s's tokens when they are not a decode token (q, out: the step's rows, offset here
  // by tok0): the prefill or generic kernel.
  void attention_seq(const float* q, const KvLayerView& kv, int64_t s, int64_t n_head, float* out);
  // Every decode sequence of the step (uses_decode_attention) in one launch of the flash-decoding kernel
  // (q, out: the step's rows; each sequence's row and cache block from its StepDev); nothing if there is none.
  // k_new (with v_new): the fused rope form, the step's unrotated k and its v.
  void attention_decode(const float* q, const KvLayerView& kv, int64_t n_head, float* out, const float* k_new,
                        const float* v_new, float freq_base, const float* ff_device);
  // step_dev_ and the pinned slots for at least n sequences (outside captures; bumps scratch_gen_ on growth,
  // since graphs hold step_dev_'s address).
  void reserve_steps(int64_t n);
  // Every op that may write device memory (a quantized row's source included) calls this first.
  void note_write() { ++op_seq_; }
  const int* xq_for(const float* x, int64_t n_cols);              // valid copy of x, or null
  // cuBLAS product; x16 = x already converted to the operand type (or null: converted here).
  void gemm(const WeightView& w, const float* x, const void* x16, float* y, int64_t n_tok);
  void not_while_capturing(const char* what) const;

  int device_;
  GgmlType kv_type_;
  int sm_count_ = 0;
  std::unique_ptr<Stream> stream_;
  std::unique_ptr<CublasHandle> cublas_;
  DevMem cublas_ws_;   // cuBLAS workspace (fixed, so GEMMs can be captured)
  DevMem step_dev_;    // (step_cap_) StepDev: the batch's sequences, in order
  int64_t step_cap_ = 0;  // sequences step_dev_ and each pinned slot hold
  // begin_step's copies come from pinned slots used in turn, so that the host never waits for the stream:
  // a pageable copy may (the driver's choice), which would stop greedy decoding's step-ahead. A slot is
  // reused once the copy that last read it has run (its event).
  static constexpr int kStepSlots = 4;
  PinnedMem step_host_;           // (kStepSlots, step_cap_) StepDev
  std::unique_ptr<Event> step_ev_[kStepSlots];  // after each slot's last copy (made on this device)
  int step_slot_ = 0;
  DevMem argmax_dev_;  // int32
  DevMem argmax_key_;  // u64 (value, index) key for the atomic reduction (argmax, top_candidates, greedy_candidate)
  PinnedMem argmax_host_;
  // Greedy decoding with the token in device memory (Backend::device_tokens).
  DevMem tok_dev_;       // (1) int32: the next step's input token
  PinnedMem tok_host_;   // (2) int32, mapped: the token chosen by the step at an even / odd position
  std::unique_ptr<Event> tok_ev_[2];  // after the step at an even / odd position (made on this device)
  int64_t tok_marked_[2] = {-1, -1};  // the position each event was last recorded for
  DevMem ids_dev_;     // (n_tok) int32 for get_rows
  static constexpr int64_t kXqMaxCols = 65536;  // the packable limit (pack.h)
  DevMem xq_;          // (quant_x_words(kXqMaxCols)) int32
  const float* xq_src_ = nullptr;
  int64_t xq_cols_ = 0;
  uint64_t op_seq_ = 0, xq_seq_ = ~uint64_t{0};
  bool has_packed_ = false;
  bool prequant_ = true;      // SHARDLM_CUDA_PREQUANT
  bool fuse_rope_ = true;     // SHARDLM_CUDA_FUSE_ROPE
  bool attn_out4_ = true;     // SHARDLM_CUDA_ATTN_OUT4
  int attn_qsplit_ = 0;       // SHARDLM_CUDA_ATTN_BLOCKS_PER_KV_HEAD: decode attention blocks per KV head (1, 2, 4; 0: by KV heads)
  bool attn_last_block_combine_ = true;  // SHARDLM_CUDA_ATTN_LAST_BLOCK_COMBINE: no combine kernel
  int64_t prequantized_ = 0;  // matmul calls that took a producer's quantized row
  int64_t pushing_ = 0;       // matmul_reduce calls whose matvec pushed its outputs to the group
  // top_candidates: key rounds (topk_scratch_keys each), extra ids and their values, and the host side.
  DevMem topk_a_, topk_b_, extra_ids_, extra_vals_;
  PinnedMem topk_host_;
  size_t topk_host_bytes_ = 0;
  DevMem attn_part_;   // decode attention partials
  DevMem attn_done_;   // (n_head_kv * qsplit) int: finished splits per attention block column, 0 between calls
  DevMem x16_;         // activations converted to 16 bits for cuBLAS
  DevMem mma_part_;     // launch_matmul_mma's column-slice partial sums
  DevMem xrows_;       // (n_tok, quant_x_ld(n_cols)) words: activations as int8 rows for launch_matvec_tokens
  DevMem w16_;         // weights dequantized to 16 bits for cuBLAS (row chunks)
  struct FreqFactors {
    const float* key;
    std::vector<float> values;
    DevMem dev;
  };
  std::vector<FreqFactors> freq_cache_;
  std::shared_ptr<std::atomic<int64_t>> user_bytes_;
  BatchInfo batch_;  // the step's batch as begin_step got it (host): the ops loop over its sequences
  bool capturing_ = false;
  bool force_generic_ = false;
  bool force_generic_attn_ = false;
  bool pack_weights_ = true;
  int pk_variant_ = 0;
  // Steps of 2 .. this many tokens take the several-token kernel for packed weights, longer ones dequantize
  // to 16 bits for cuBLAS (SHARDLM_CUDA_TOKENS_MAX, 1 turns the kernel off); 0: by weight type,
  // cuda_tokens_max_default.
  int64_t tokens_max_ = 0;
  // Steps of more tokens than the several-token kernel takes, up to this many, multiply packed weights with
  // the tensor-core kernel (launch_matmul_mma) rather than dequantizing them for cuBLAS (CudaTuning::mma_max;
  // 0: never).
  int64_t mma_max_ = 0;
  // SHARDLM_CUDA_SKIP (measurement only): one-token kernels of these kinds are not launched.
  enum Skip : int { kSkipNorm = 1, kSkipSwiglu = 2, kSkipRope = 4, kSkipAttn = 8, kSkipMatvec = 16, kSkipAllReduce = 32 };
  // Matmuls with at least this many rows still run under kSkipMatvec: the output head, whose logits the
  // step's token selection reads.
  static constexpr int64_t kSkipKeepRows = 100000;
  int skip_ = 0;
  bool graph_timing_ = false;  // CudaTuning::graph_timing: graph runners on this backend time their replays
  int64_t scratch_gen_ = 0;
};

// The backend behind `b`, or Error if it is not a CUDA backend.
CudaBackend& as_cuda(Backend& b, const char* caller);

}  // namespace shardlm::cuda_detail
