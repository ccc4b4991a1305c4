#include "runtime/scheduler.h"

#include <algorithm>

#include "core/error.h"

namespace shardlm {

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::kStop: return "stop";
    case FinishReason::kLength: return "length";
    case FinishReason::kAborted: return "abort";
    case FinishReason::kNone: break;
  }
  return "";
}

Scheduler::Scheduler(const SchedulerOptions& options) : o_(options), alloc_(options.n_blocks) {
  if (o_.max_num_seqs < 1) fail("--max-num-seqs ", o_.max_num_seqs, " must be >= 1");
  // Every running sequence gets its decode token each step; a smaller budget would starve the newest ones.
  if (o_.max_num_batched_tokens < o_.max_num_seqs)
    fail("--max-num-batched-tokens ", o_.max_num_batched_tokens, " must be >= --max-num-seqs ", o_.max_num_seqs);
  if (o_.n_ctx < 1) fail("context size ", o_.n_ctx, " must be >= 1");
  if (o_.block_size < 1) fail("KV block size ", o_.block_size, " must be >= 1");
}

int64_t Scheduler::add(std::vector<int32_t> prompt, const SequenceParams& params) {
  if (prompt.empty()) fail("the prompt is empty: give at least one token");
  const int64_t n = static_cast<int64_t>(prompt.size());
  if (n > o_.n_ctx)
    fail("the prompt (", n, " tokens) is longer than the context size ", o_.n_ctx, " (raise -c or shorten it)");
  if (!params.score_only && params.max_tokens < 1) fail("max_tokens ", params.max_tokens, " must be >= 1");
  if (params.score_from < 0 || params.score_from >= n)
    fail("score_from ", params.score_from, " is outside the prompt's positions [0, ", n, ")");
  params.sampling.validate();
  // Its longest life: the prompt plus every generated token but the last (which is never fed back),
  // capped by the context.
  const int64_t longest = params.score_only ? n : std::min(o_.n_ctx, n + params.max_tokens - 1);
  const int64_t need = kv_blocks_for(longest, o_.block_size);
  if (need > alloc_.n_blocks())
    fail("the request needs ", need, " KV blocks of ", o_.block_size, " positions (", longest,
         " positions), more than the whole KV pool of ", alloc_.n_blocks(), " blocks");
  const int64_t id = next_id_++;
  Seq s;
  s.n_prompt = n;
  s.tokens = std::move(prompt);
  s.params = params;
  seqs_.emplace(id, std::move(s));
  waiting_.push_back(id);
  return id;
}

Scheduler::Seq& Scheduler::live(int64_t id) {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) fail_kind(ErrorKind::kInternal, "sequence ", id, " is not live");
  return it->second;
}

const Scheduler::Seq& Scheduler::live(int64_t id) const {
  auto it = seqs_.find(id);
  if (it == seqs_.end()) fail_kind(ErrorKind::kInternal, "sequence ", id, " is not live");
  return it->second;
}

const std::vector<int32_t>& Scheduler::tokens(int64_t id) const { return live(id).tokens; }
const SequenceParams& Scheduler::params(int64_t id) const { return live(id).params; }

void Scheduler::drop_blocks(Seq& s) {
  alloc_.release_all(s.blocks);
  s.blocks.clear();
  s.n_computed = 0;
  s.n_published = 0;
  s.chain = -1;
}

void Scheduler::match_prefix(Seq& s) {
  if (!o_.prefix_caching || s.params.score_only || !s.blocks.empty()) return;
  // At least the prompt's last token is computed again: its row gives the first sampled token.
  const int64_t bs = o_.block_size;
  const int64_t full = (static_cast<int64_t>(s.tokens.size()) - 1) / bs;
  int32_t parent = -1;
  for (int64_t i = 0; i < full; ++i) {
    const int32_t b = alloc_.lookup(parent, s.tokens.data() + i * bs, bs);
    if (b < 0) break;
    alloc_.retain(b);
    s.blocks.push_back(b);
    parent = b;
  }
  s.n_computed = static_cast<int64_t>(s.blocks.size()) * bs;
  s.n_published = static_cast<int64_t>(s.blocks.size());
  s.chain = parent;
  s.n_cached = std::min(s.n_computed, s.n_prompt);
}

void Scheduler::publish_blocks(Seq& s) {
  if (!o_.prefix_caching || s.params.score_only) return;
  const int64_t bs = o_.block_size;
  for (; s.n_published < s.n_computed / bs; ++s.n_published) {
    const auto i = static_cast<size_t>(s.n_published);
    s.chain = alloc_.publish(s.blocks[i], s.chain, s.tokens.data() + s.n_published * bs, bs);
  }
}

void Scheduler::preempt(int64_t id) {
  Seq& s = live(id);
  drop_blocks(s);
  running_.erase(std::find(running_.begin(), running_.end(), id));
  waiting_.push_front(id);
  ++preemptions_;
}

void Scheduler::finish(int64_t id) {
  Seq& s = live(id);
  alloc_.release_all(s.blocks);
  running_.erase(std::remove(running_.begin(), running_.end(), id), running_.end());
  waiting_.erase(std::remove(waiting_.begin(), waiting_.end(), id), waiting_.end());
  seqs_.erase(id);
}

bool Scheduler::abort(int64_t id) {
  if (!seqs_.count(id)) return false;
  finish(id);
  return true;
}

StepPlan Scheduler::schedule() {
  int64_t budget = o_.max_num_batched_tokens;
  const int64_t preempted_before = preemptions_;
  std::vector<std::pair<int64_t, int32_t>> picked;  // (id, tokens this step)
  // Blocks for positions [0, upto) of s; false (nothing taken) when the pool cannot give them.
  auto grow = [&](Seq& s, int64_t upto) {
    const int64_t need = kv_blocks_for(upto, o_.block_size) - static_cast<int64_t>(s.blocks.size());
    return need <= 0 || alloc_.allocate(need, &s.blocks);
  };
  // Running sequences, oldest first: the rest of their prompt or one decode token.
  for (size_t i = 0; i < running_.size() && budget > 0;) {
    const int64_t id = running_[i];
    Seq& s = live(id);
    const int64_t n = std::min<int64_t>(static_cast<int64_t>(s.tokens.size()) - s.n_computed, budget);
    if (n <= 0) fail_kind(ErrorKind::kInternal, "running sequence ", id, " has nothing to compute");
    bool ok = grow(s, s.n_computed + n);
    while (!ok) {
      // Out of blocks: the newest running sequence gives its blocks back (possibly this one).
      const int64_t victim = running_.back();
      preempt(victim);
      if (victim == id) break;
      ok = grow(s, s.n_computed + n);
    }
    if (!ok) break;  // this one was the newest: nothing after it runs either
    picked.emplace_back(id, static_cast<int32_t>(n));
    budget -= n;
    ++i;
  }
  // Waiting sequences join in order while there is room: a chunk of what they have to compute. Not in a
  // step that preempted: the victim would be planned again at once from position 0 with the blocks it just
  // gave back, and preempted again next step (vLLM admits nothing after a preemption for the same reason).
  while (preemptions_ == preempted_before && !waiting_.empty() && budget > 0 &&
         static_cast<int64_t>(running_.size()) < o_.max_num_seqs) {
    const int64_t id = waiting_.front();
    Seq& s = live(id);
    match_prefix(s);
    const int64_t n = std::min<int64_t>(static_cast<int64_t>(s.tokens.size()) - s.n_computed, budget);
    if (!grow(s, s.n_computed + n)) {
      drop_blocks(s);  // matched blocks go back (still cached); matched again when it is admitted
      break;           // first come first served: nobody overtakes it
    }
    if (o_.prefix_caching && !s.params.score_only) {
      prefix_queries_ += s.n_prompt;
      prefix_hits_ += s.n_cached;
    }
    waiting_.pop_front();
    running_.push_back(id);
    picked.emplace_back(id, static_cast<int32_t>(n));
    budget -= n;
  }
  StepPlan plan;
  if (picked.empty()) return plan;
  BatchInfo& b = plan.batch;
  b.max_blocks = kv_blocks_for(o_.n_ctx, o_.block_size);
  for (const auto& [id, n] : picked) {
    const Seq& s = live(id);
    PlannedSeq p;
    p.id = id;
    p.n_tok = n;
    p.pos0 = static_cast<int32_t>(s.n_computed);
    const bool reaches_end = s.n_computed + n == static_cast<int64_t>(s.tokens.size());
    p.scores = s.params.score_only;
    p.samples = reaches_end && !s.params.score_only;
    const int32_t tok0 = static_cast<int32_t>(b.n_tok);
    b.seqs.push_back(BatchSeq{tok0, n, p.pos0});
    b.n_tok += n;
    plan.ids.insert(plan.ids.end(), s.tokens.begin() + s.n_computed, s.tokens.begin() + s.n_computed + n);
    std::vector<int32_t> row(static_cast<size_t>(b.max_blocks), -1);
    std::copy(s.blocks.begin(), s.blocks.end(), row.begin());
    b.block_table.insert(b.block_table.end(), row.begin(), row.end());
    const int64_t si = static_cast<int64_t>(plan.seqs.size());
    if (p.scores) {
      for (int32_t t = std::max(0, s.params.score_from - p.pos0); t < n; ++t) {
        b.out_rows.push_back(tok0 + t);
        plan.row_seq.push_back(si);
      }
    } else if (p.samples) {
      b.out_rows.push_back(tok0 + n - 1);
      plan.row_seq.push_back(si);
    }
    plan.seqs.push_back(p);
  }
  return plan;
}

std::vector<SeqEvent> Scheduler::commit(const StepPlan& plan, const std::vector<int32_t>& sampled) {
  std::vector<SeqEvent> events;
  size_t next = 0;
  for (const PlannedSeq& p : plan.seqs) {
    auto it = seqs_.find(p.id);
    if (it == seqs_.end()) {
      // Aborted while its step ran: its token (if any) is dropped.
      if (p.samples) ++next;
      continue;
    }
    Seq& s = it->second;
    s.n_computed = p.pos0 + p.n_tok;
    publish_blocks(s);
    if (p.scores) {
      if (s.n_computed == static_cast<int64_t>(s.tokens.size())) {
        SeqEvent e;
        e.id = p.id;
        e.finish = FinishReason::kStop;
        events.push_back(e);
        finish(p.id);
      }
      continue;
    }
    if (!p.samples) continue;
    if (next >= sampled.size())
      fail_kind(ErrorKind::kInternal, "commit: ", sampled.size(), " sampled tokens for more sampling sequences");
    const int32_t tok = sampled[next++];
    s.tokens.push_back(tok);
    SeqEvent e;
    e.id = p.id;
    e.token = tok;
    e.cached_prompt_tokens = s.n_cached;
    const int64_t generated = static_cast<int64_t>(s.tokens.size()) - s.n_prompt;
    const auto& stop = s.params.stop_ids;
    if (std::find(stop.begin(), stop.end(), tok) != stop.end())
      e.finish = FinishReason::kStop;
    else if (generated >= s.params.max_tokens || static_cast<int64_t>(s.tokens.size()) > o_.n_ctx)
      e.finish = FinishReason::kLength;  // the token is returned, but there is no position to feed it at
    events.push_back(e);
    if (e.finish != FinishReason::kNone) finish(p.id);
  }
  if (next != sampled.size())
    fail_kind(ErrorKind::kInternal, "commit: ", sampled.size(), " sampled tokens for ", next, " sampling sequences");
  return events;
}

bool Scheduler::reserve(int64_t id, int64_t ctx, BatchInfo* batch) {
  Seq& s = live(id);
  if (ctx > o_.n_ctx) fail_kind(ErrorKind::kInternal, "reserve of ", ctx, " positions in a context of ", o_.n_ctx);
  if (batch->n_seq() != 1) fail_kind(ErrorKind::kInternal, "reserve for a batch of ", batch->n_seq(), " sequences");
  const int64_t need = kv_blocks_for(ctx, o_.block_size) - static_cast<int64_t>(s.blocks.size());
  if (need > 0 && !alloc_.allocate(need, &s.blocks)) return false;
  std::copy(s.blocks.begin(), s.blocks.end(), batch->block_table.begin());
  return true;
}

std::vector<SeqEvent> Scheduler::commit_run(int64_t id, const std::vector<int32_t>& tokens) {
  std::vector<SeqEvent> events;
  for (int32_t tok : tokens) {
    const Seq& s = live(id);
    StepPlan one;
    PlannedSeq p;
    p.id = id;
    p.n_tok = 1;
    p.pos0 = static_cast<int32_t>(s.tokens.size() - 1);
    p.samples = true;
    one.seqs.push_back(p);
    const std::vector<SeqEvent> e = commit(one, {tok});
    events.insert(events.end(), e.begin(), e.end());
    if (!e.empty() && e.back().finish != FinishReason::kNone) break;
  }
  return events;
}

}  // namespace shardlm
