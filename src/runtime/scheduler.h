// Continuous batching: which sequences run in the next forward step and how many tokens each.
//
// Pure (no model, no device, no communicator): the engine on rank 0 asks it for each step's plan, runs the
// plan on every rank, and hands the sampled tokens back. Its rules, after vLLM's v1 scheduler:
// - A step holds at most max_num_seqs sequences and max_num_batched_tokens tokens.
// - Running sequences go first, oldest first: one token each in decode, or the next chunk of a prompt
//   whose prefill is not finished. Then waiting sequences join, first come first served, with a chunk of
//   their prompt that fits the remaining token budget (chunked prefill: a long prompt never stalls the
//   decoding sequences for more than one step's budget).
// - Every token's KV row needs a block: blocks are taken as positions grow. When a running sequence needs
//   one and the pool is empty, the newest running sequence is preempted: its blocks go back, its tokens are
//   kept, and it waits at the head of the queue to be recomputed. A waiting sequence that cannot get its
//   blocks waits (nothing behind it overtakes it). So a step never needs more blocks than the pool has.
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <vector>

#include "ops/batch.h"
#include "runtime/kv_pool.h"
#include "runtime/sampler.h"

namespace shardlm {

struct SchedulerOptions {
  int64_t max_num_seqs = 1;              // sequences in one step (and running at once)
  int64_t max_num_batched_tokens = 512;  // tokens in one step: decode tokens plus prompt chunks
  int64_t n_ctx = 0;                     // positions one sequence may use
  int64_t block_size = 16;               // positions per KV block
  int64_t n_blocks = 0;                  // blocks in the pool
  // Prefix caching (vLLM's --enable-prefix-caching): full KV blocks stay known by their token prefix after
  // their sequence ends (until the pool needs them), and a new sequence whose prompt starts with such
  // blocks reuses them instead of computing those positions again. Off: every prompt is computed whole.
  bool prefix_caching = false;
};

struct SequenceParams {
  SamplerParams sampling;
  int64_t max_tokens = 16;         // tokens to generate, >= 1 (ignored when score_only)
  std::vector<int32_t> stop_ids;   // generation ends after sampling one of these (it is returned)
  bool score_only = false;         // no generation: the logits of every prompt position are returned
  int32_t score_from = 0;          // score_only: only positions >= this one return logits (perplexity
                                   // scores the second half of each chunk: no rows for the first half)
  // Log-probabilities of the raw model distribution (log_softmax of the logits, before sampling's
  // penalties, temperature and truncation, as vLLM reports them): -1 none; 0 the sampled token's; N > 0 also
  // the N most likely tokens' (at most kMaxTopLogprobs).
  int32_t logprobs = -1;
  static constexpr int32_t kMaxTopLogprobs = 20;
};

enum class FinishReason { kNone, kStop, kLength, kAborted };
const char* finish_reason_name(FinishReason r);  // "stop", "length", "abort", ""

// One sequence's part of a step.
struct PlannedSeq {
  int64_t id = 0;
  int32_t n_tok = 0;     // tokens it computes in this step
  int32_t pos0 = 0;      // position of the first of them
  bool samples = false;  // the step reaches its last token: a new token is sampled from that row
  bool scores = false;   // score_only: its rows at positions >= score_from are out rows
};

struct StepPlan {
  std::vector<int32_t> ids;         // (batch.n_tok) input tokens, in batch order
  BatchInfo batch;                  // the step's descriptor (block tables, out rows)
  std::vector<PlannedSeq> seqs;     // (batch.n_seq()) in batch order
  std::vector<int64_t> row_seq;     // (batch.out_rows.size()) the sequence index (into seqs) of each out row
  bool empty() const { return batch.n_tok == 0; }
};

// What a step did to one sequence.
struct SeqEvent {
  int64_t id = 0;
  int32_t token = -1;  // the token sampled this step, -1 if none
  FinishReason finish = FinishReason::kNone;
  // With SequenceParams::logprobs >= 0: the token's log-probability, and the params.logprobs most likely
  // tokens (TokenCandidate::logit holding the log-probability), most likely first.
  float logprob = 0.0f;
  std::vector<TokenCandidate> top_logprobs;
  // Prefix caching: prompt tokens whose KV rows came from the cache at the sequence's admission.
  int64_t cached_prompt_tokens = 0;
};

class Scheduler {
 public:
  explicit Scheduler(const SchedulerOptions& options);

  // Queues a sequence; returns its id (1, 2, ... in order of arrival). Throws Error naming the limit when
  // it can never run: an empty prompt, a token outside [0, n_vocab) is the caller's check; here a prompt
  // longer than the context, or more KV blocks than the whole pool for its longest possible length.
  int64_t add(std::vector<int32_t> prompt, const SequenceParams& params);
  // Ends a sequence wherever it is; its blocks are free at once. Unknown or finished ids are ignored.
  // Returns whether it was live.
  bool abort(int64_t id);

  bool has_work() const { return !running_.empty() || !waiting_.empty(); }
  int64_t n_running() const { return static_cast<int64_t>(running_.size()); }
  int64_t n_waiting() const { return static_cast<int64_t>(waiting_.size()); }
  int64_t n_preemptions() const { return preemptions_; }
  // Prefix caching: prompt tokens looked up at admission, and those found in cached blocks (vLLM's
  // prefix_cache_queries / prefix_cache_hits).
  int64_t prefix_query_tokens() const { return prefix_queries_; }
  int64_t prefix_hit_tokens() const { return prefix_hits_; }
  // A live sequence's prompt tokens taken from cached blocks at its (last) admission.
  int64_t cached_prompt_tokens(int64_t id) const { return live(id).n_cached; }
  const KvBlockAllocator& blocks() const { return alloc_; }
  const SchedulerOptions& options() const { return o_; }

  // The next step's plan; empty when no sequence can run (nothing queued, or the head of the queue waits
  // for blocks that running sequences hold: then a running sequence always runs, so this happens only with
  // nothing running).
  StepPlan schedule();
  // After the plan ran: `sampled` holds one token per sampling sequence of the plan (seqs with samples,
  // in plan order). Appends them, finishes sequences (stop id, max_tokens, context full; score_only ones
  // after their last chunk) and frees their blocks. Returns one event per sequence that sampled or finished.
  std::vector<SeqEvent> commit(const StepPlan& plan, const std::vector<int32_t>& sampled);

  // A greedy run on the device (Engine): the running sequence `id`, planned for one decode step, gets
  // blocks for positions [0, ctx) in advance, written into its row of `batch` too. False (nothing taken)
  // when the pool cannot give them.
  bool reserve(int64_t id, int64_t ctx, BatchInfo* batch);
  // Its tokens, each computed in turn from the position the plan gave it: as commit for each of them.
  std::vector<SeqEvent> commit_run(int64_t id, const std::vector<int32_t>& tokens);

  // A live sequence's tokens (prompt then generated) and parameters, for the sampler.
  int64_t prompt_length(int64_t id) const { return live(id).n_prompt; }
  const std::vector<int32_t>& tokens(int64_t id) const;
  const SequenceParams& params(int64_t id) const;

 private:
  struct Seq {
    std::vector<int32_t> tokens;  // prompt then generated
    int64_t n_prompt = 0;
    int64_t n_computed = 0;       // positions whose KV rows are in its blocks
    std::vector<int32_t> blocks;  // its block table
    SequenceParams params;
    int64_t n_published = 0;      // prefix caching: its leading full blocks offered to the cache ...
    int32_t chain = -1;           // ... and the cached block holding the last of them (-1: none)
    int64_t n_cached = 0;         // prompt positions found in the cache at admission
  };
  Seq& live(int64_t id);
  const Seq& live(int64_t id) const;
  void preempt(int64_t id);
  void finish(int64_t id);
  // Prefix caching: a sequence about to be admitted takes the cached blocks its prompt starts with; a
  // sequence's newly computed full blocks are offered to the cache.
  void match_prefix(Seq& s);
  void drop_blocks(Seq& s);
  void publish_blocks(Seq& s);

  SchedulerOptions o_;
  KvBlockAllocator alloc_;
  std::map<int64_t, Seq> seqs_;  // live sequences
  std::vector<int64_t> running_; // admitted, oldest first
  std::deque<int64_t> waiting_;  // not admitted (new or preempted), in order
  int64_t next_id_ = 1;
  int64_t preemptions_ = 0;
  int64_t prefix_queries_ = 0, prefix_hits_ = 0;
};

}  // namespace shardlm
