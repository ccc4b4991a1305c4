// Tokenizer implementations.
//
// SentencePiece ("llama" in GGUF) follows llama.cpp's llm_tokenizer_spm: merge the adjacent pair whose
// concatenation is the highest-scoring token until none is left, then fall back to <0xNN> byte tokens.
// Byte-level BPE ("gpt2") and Hugging Face's BPE follow merge ranks: lowest rank first, ties leftmost
// (llama.cpp's llm_tokenizer_bpe and tokenizers' Word::merge_all agree on this order).
#include "tokenizer/tokenizer.h"

#include <algorithm>
#include <array>
#include <queue>
#include <unordered_map>

#include "core/error.h"
#include "tokenizer/pretokenize.h"
#include "tokenizer/unicode.h"

namespace shardlm {
namespace {

constexpr std::string_view kMarker = "\xE2\x96\x81";  // U+2581, SentencePiece's visible space

struct StrHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using PieceMap = std::unordered_map<std::string, int32_t, StrHash, std::equal_to<>>;

int hex_digit(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  return -1;
}

// "<0xNN>" -> NN, anything else -> -1.
int parse_byte_token(std::string_view t) {
  if (t.size() != 6 || t.substr(0, 3) != "<0x" || t[5] != '>') return -1;
  const int hi = hex_digit(t[3]), lo = hex_digit(t[4]);
  return (hi < 0 || lo < 0) ? -1 : hi * 16 + lo;
}

std::string byte_token_text(uint8_t b) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  return std::string{'<', '0', 'x', kHex[b >> 4], kHex[b & 15], '>'};
}

std::string replace_all(std::string_view s, std::string_view from, std::string_view to) {
  std::string r;
  r.reserve(s.size());
  size_t pos = 0;
  for (size_t hit; (hit = s.find(from, pos)) != std::string_view::npos; pos = hit + from.size()) {
    r.append(s.substr(pos, hit - pos));
    r.append(to);
  }
  r.append(s.substr(pos));
  return r;
}

// Everything Tokenizer::create checks, so the implementations can index without further checks.
void validate(const Vocab& v) {
  const size_t n = v.tokens.size();
  if (n == 0) fail("vocabulary: tokens is empty");
  if (n > static_cast<size_t>(INT32_MAX))
    fail("vocabulary: ", n, " tokens exceed the limit of ", INT32_MAX);
  if (!v.scores.empty() && v.scores.size() != n)
    fail("vocabulary: scores has ", v.scores.size(), " entries but tokens has ", n);
  if (!v.types.empty() && v.types.size() != n)
    fail("vocabulary: token types has ", v.types.size(), " entries but tokens has ", n);
  for (size_t i = 0; i < n; ++i)
    if (v.tokens[i].empty()) fail("vocabulary: token ", i, " is empty");
  for (size_t i = 0; i < v.types.size(); ++i) {
    const auto t = static_cast<int32_t>(v.types[i]);
    if (t < 0 || t > 6) fail("vocabulary: token ", i, " has type ", t, " (valid 0..6)");
    if (v.types[i] == TokenType::kByte && parse_byte_token(v.tokens[i]) < 0)
      fail("vocabulary: token ", i, " '", v.tokens[i], "' has type byte but is not of the form <0xNN>");
  }
  const auto check_id = [&](int32_t id, const char* what) {
    if (id < -1 || id >= static_cast<int64_t>(n))
      fail("vocabulary: ", what, " id ", id, " is outside the vocabulary [0, ", n, ")");
  };
  check_id(v.bos, "bos");
  check_id(v.eos, "eos");
  check_id(v.unk, "unk");
  check_id(v.pad, "pad");
}

struct Fragment {
  int32_t id;  // >= 0: a special token; -1: raw text
  size_t begin, end;
};

// Shared by every model: special-token partitioning, BOS/EOS, piece tables and decoding.
class TokenizerBase : public Tokenizer {
 public:
  // Byte-level pieces are exactly the kBpe model's; SPM-style pieces (scores or Hugging Face merges)
  // mark spaces with U+2581 instead.
  explicit TokenizerBase(Vocab v)
      : Tokenizer(std::move(v)), byte_level_(vocab_.model == Vocab::Model::kBpe) {
    const auto n = static_cast<int32_t>(vocab_.tokens.size());
    piece_to_id_.reserve(vocab_.tokens.size());
    // Later duplicates win, as in llama.cpp's token_to_id.
    for (int32_t i = 0; i < n; ++i) piece_to_id_[vocab_.tokens[i]] = i;
    for (int32_t i = 0; i < n; ++i) {
      const TokenType t = type(i);
      if (t == TokenType::kControl || t == TokenType::kUserDefined || t == TokenType::kUnknown)
        specials_.push_back(i);
    }
    // Longest first, so that a special token containing another one wins.
    std::stable_sort(specials_.begin(), specials_.end(), [&](int32_t a, int32_t b) {
      return vocab_.tokens[a].size() > vocab_.tokens[b].size();
    });
    for (int b = 0; b < 256; ++b) {
      byte_ids_[b] = find(byte_token_text(static_cast<uint8_t>(b)));
    }
    for (int parse = 0; parse < 2; ++parse)
      for (int32_t id : specials_)
        if (eligible(id, parse == 1))
          by_first_byte_[parse][static_cast<uint8_t>(vocab_.tokens[id][0])].push_back(id);
  }

  std::vector<int32_t> encode(std::string_view text, bool add_special,
                              bool parse_special) const override {
    std::vector<int32_t> out;
    if (add_special && vocab_.add_bos && vocab_.bos >= 0) out.push_back(vocab_.bos);
    bool after_special = true;  // the start of the text counts as following a special token
    for (const Fragment& f : partition(text, parse_special)) {
      if (f.id >= 0) {
        out.push_back(f.id);
        after_special = true;
        continue;
      }
      encode_segment(text.substr(f.begin, f.end - f.begin), f.begin == 0, after_special, out);
      after_special = false;
    }
    if (add_special && vocab_.add_eos && vocab_.eos >= 0) out.push_back(vocab_.eos);
    return out;
  }

  std::string token_to_piece(int32_t id) const override {
    if (id < 0 || id >= n_vocab())
      fail("token id ", id, " is outside the vocabulary [0, ", n_vocab(), ")");
    const std::string& text = vocab_.tokens[id];
    switch (type(id)) {
      case TokenType::kControl:
      case TokenType::kUnused:
        return "";
      case TokenType::kUnknown:
        // llama.cpp shows unknown pieces as U+2585 in SentencePiece vocabularies.
        return byte_level_ ? "" : "\xE2\x96\x85";
      case TokenType::kUserDefined:
        return text;
      case TokenType::kByte:
        return std::string(1, static_cast<char>(parse_byte_token(text)));
      case TokenType::kNormal:
      case TokenType::kUndefined:
        break;
    }
    if (!byte_level_) return replace_all(text, kMarker, " ");
    std::string r;
    for (size_t pos = 0; pos < text.size();) {
      const Utf8Char c = utf8_decode(text, pos);
      const int b = unicode_to_byte(c.cp);
      // Characters outside the byte alphabet (hand-made vocabularies) are kept as they are.
      if (b >= 0) r.push_back(static_cast<char>(b));
      else r.append(text.substr(pos, c.len));
      pos += c.len;
    }
    return r;
  }

  std::string decode(const std::vector<int32_t>& ids) const override {
    std::string out;
    bool strip = !byte_level_ && vocab_.add_space_prefix;
    for (int32_t id : ids) {
      std::string piece = token_to_piece(id);
      if (strip && !piece.empty()) {
        if (piece[0] == ' ') piece.erase(0, 1);
        strip = false;
      }
      out += piece;
    }
    return out;
  }

 protected:
  // Encodes text between special tokens. `at_start`: the segment begins the text; `after_special`:
  // it begins the text or follows a special token.
  virtual void encode_segment(std::string_view seg, bool at_start, bool after_special,
                              std::vector<int32_t>& out) const = 0;

  int32_t find(std::string_view piece) const {
    const auto it = piece_to_id_.find(piece);
    return it == piece_to_id_.end() ? -1 : it->second;
  }
  TokenType type(int32_t id) const {
    return vocab_.types.empty() ? TokenType::kNormal : vocab_.types[id];
  }
  int32_t byte_id(uint8_t b) const { return byte_ids_[b]; }

 private:
  bool eligible(int32_t id, bool parse_special) const {
    // Like llama.cpp and Hugging Face, user-defined (non-special added) tokens always match.
    return parse_special || type(id) == TokenType::kUserDefined;
  }

  std::vector<Fragment> partition(std::string_view text, bool parse_special) const {
    if (text.empty()) return {};
    if (vocab_.hf.enabled) return partition_leftmost_longest(text, parse_special);
    std::vector<Fragment> frags{{-1, 0, text.size()}};
    // llama.cpp: each special token in turn (longest first) splits every raw fragment left.
    std::vector<Fragment> next;
    for (int32_t id : specials_) {
      if (!eligible(id, parse_special)) continue;
      const std::string& tok = vocab_.tokens[id];
      if (text.find(tok) == std::string_view::npos) continue;
      next.clear();
      for (const Fragment& f : frags) {
        if (f.id >= 0) {
          next.push_back(f);
          continue;
        }
        size_t pos = f.begin;
        for (;;) {
          const size_t hit = text.find(tok, pos);
          if (hit == std::string_view::npos || hit + tok.size() > f.end) break;
          if (hit > pos) next.push_back({-1, pos, hit});
          next.push_back({id, hit, hit + tok.size()});
          pos = hit + tok.size();
        }
        if (pos < f.end) next.push_back({-1, pos, f.end});
      }
      frags.swap(next);
    }
    return frags;
  }

  // Hugging Face's AddedVocabulary: one left-to-right scan taking the longest token at each position.
  std::vector<Fragment> partition_leftmost_longest(std::string_view text, bool parse_special) const {
    std::vector<Fragment> frags;
    const auto& by_first = by_first_byte_[parse_special ? 1 : 0];
    size_t raw_begin = 0;
    for (size_t pos = 0; pos < text.size();) {
      int32_t match = -1;
      for (int32_t id : by_first[static_cast<uint8_t>(text[pos])]) {
        if (text.substr(pos).starts_with(vocab_.tokens[id])) {
          match = id;  // candidates are longest first
          break;
        }
      }
      if (match < 0) {
        ++pos;
        continue;
      }
      if (pos > raw_begin) frags.push_back({-1, raw_begin, pos});
      frags.push_back({match, pos, pos + vocab_.tokens[match].size()});
      pos += vocab_.tokens[match].size();
      raw_begin = pos;
    }
    if (raw_begin < text.size()) frags.push_back({-1, raw_begin, text.size()});
    return frags;
  }

  bool byte_level_;
  PieceMap piece_to_id_;
  std::vector<int32_t> specials_;
  // Candidates for the Hugging Face scan by first byte, longest first; [1] when parsing specials.
  std::array<std::array<std::vector<int32_t>, 256>, 2> by_first_byte_;
  std::array<int32_t, 256> byte_ids_{};
};

// ---------------------------------------------------------------------------------------------------
// SentencePiece by scores (GGUF "llama").
class SpmTokenizer final : public TokenizerBase {
 public:
  explicit SpmTokenizer(Vocab v) : TokenizerBase(std::move(v)) {
    if (vocab_.scores.empty()) vocab_.scores.assign(vocab_.tokens.size(), 0.0f);
  }

 protected:
  void encode_segment(std::string_view seg, bool /*at_start*/, bool after_special,
                      std::vector<int32_t>& out) const override {
    std::string text;
    if (vocab_.add_space_prefix && after_special) text = " ";
    text += seg;
    text = replace_all(text, " ", kMarker);
    tokenize(text, out);
  }

 private:
  struct Symbol {
    int32_t prev, next;
    uint32_t off, n;
  };
  struct Bigram {
    float score;
    int32_t left, right;
    size_t size;
  };
  struct BigramLess {
    // Highest score on top; ties go to the leftmost pair.
    bool operator()(const Bigram& l, const Bigram& r) const {
      return l.score < r.score || (l.score == r.score && l.left > r.left);
    }
  };
  using Queue = std::priority_queue<Bigram, std::vector<Bigram>, BigramLess>;

  void try_add_bigram(std::string_view text, const std::vector<Symbol>& syms, int32_t left,
                      int32_t right, Queue& q) const {
    if (left < 0 || right < 0) return;
    // Symbols are contiguous in `text`, so the pair is a substring; no allocation.
    const std::string_view pair = text.substr(syms[left].off, syms[left].n + syms[right].n);
    const int32_t id = find(pair);
    if (id < 0) return;
    q.push({vocab_.scores[id], left, right, pair.size()});
  }

  void tokenize(std::string_view text, std::vector<int32_t>& out) const {
    if (text.empty()) return;
    std::vector<Symbol> syms;
    syms.reserve(text.size());
    for (size_t off = 0; off < text.size();) {
      const size_t len =
          std::min(utf8_len_from_lead(static_cast<uint8_t>(text[off])), text.size() - off);
      const auto idx = static_cast<int32_t>(syms.size());
      syms.push_back({idx - 1, off + len == text.size() ? -1 : idx + 1, static_cast<uint32_t>(off),
                      static_cast<uint32_t>(len)});
      off += len;
    }
    Queue q;
    for (int32_t i = 1; i < static_cast<int32_t>(syms.size()); ++i) try_add_bigram(text, syms, i - 1, i, q);
    while (!q.empty()) {
      const Bigram b = q.top();
      q.pop();
      Symbol& l = syms[b.left];
      Symbol& r = syms[b.right];
      // Stale entry: one side was merged away or grew since the pair was queued.
      if (l.n == 0 || r.n == 0 || l.n + r.n != b.size) continue;
      l.n += r.n;
      r.n = 0;
      l.next = r.next;
      if (r.next >= 0) syms[r.next].prev = b.left;
      try_add_bigram(text, syms, l.prev, b.left, q);
      try_add_bigram(text, syms, b.left, l.next, q);
    }
    for (int32_t i = 0; i != -1; i = syms[i].next) {
      const std::string_view piece = text.substr(syms[i].off, syms[i].n);
      const int32_t id = find(piece);
      if (id >= 0) {
        out.push_back(id);
        continue;
      }
      for (char c : piece) out.push_back(byte_fallback(static_cast<uint8_t>(c)));
    }
  }

  int32_t byte_fallback(uint8_t b) const {
    if (int32_t id = byte_id(b); id >= 0) return id;
    if (int32_t id = find(std::string_view(reinterpret_cast<const char*>(&b), 1)); id >= 0) return id;
    if (vocab_.unk >= 0) return vocab_.unk;
    fail("vocabulary has neither the byte token ", byte_token_text(b),
         " nor an unknown token to encode byte ", static_cast<int>(b));
  }
};

// ---------------------------------------------------------------------------------------------------
// BPE by merge ranks: GGUF "gpt2" (byte-level) and every Hugging Face BPE model.
class BpeTokenizer final : public TokenizerBase {
 public:
  explicit BpeTokenizer(Vocab v)
      : TokenizerBase(std::move(v)), byte_level_mode_(vocab_.model == Vocab::Model::kBpe) {
    split_ = byte_level_mode_ ? pre_split_from_name(vocab_.pre) : PreSplit::kNone;
    merges_.reserve(vocab_.merges.size());
    for (size_t i = 0; i < vocab_.merges.size(); ++i) {
      const std::string& m = vocab_.merges[i];
      // The separator is searched from index 1, as llama.cpp does, so a left piece may be " ".
      const size_t sp = m.size() > 1 ? m.find(' ', 1) : std::string::npos;
      if (sp == std::string::npos || sp + 1 >= m.size())
        fail("vocabulary: merges[", i, "] '", m, "' is not of the form 'left right'");
      const std::string_view a(m.data(), sp), b(m.data() + sp + 1, m.size() - sp - 1);
      const std::string ab = std::string(a) + std::string(b);
      if (vocab_.hf.enabled) {
        // Hugging Face refuses merges of pieces outside the vocabulary; so do we.
        for (std::string_view piece : {a, b, std::string_view(ab)})
          if (find(piece) < 0)
            fail("tokenizer.json: model.merges[", i, "] '", m, "' uses '", piece,
                 "', which is not in the vocabulary");
      }
      const uint64_t key = pair_key(piece_id(a, true), piece_id(b, true));
      // The first occurrence of a pair keeps its rank (llama.cpp's bpe_ranks.emplace).
      merges_.emplace(key, Merge{static_cast<int32_t>(i), piece_id(ab, true)});
    }
  }

 protected:
  void encode_segment(std::string_view seg, bool at_start, bool /*after_special*/,
                      std::vector<int32_t>& out) const override {
    if (byte_level_mode_) {
      std::string text;
      if (vocab_.hf.enabled && vocab_.hf.add_prefix_space && !seg.starts_with(' ')) text = " ";
      text += seg;
      const auto& b2u = byte_to_unicode();
      std::string word;
      for (std::string_view w : pre_split(text, split_)) {
        word.clear();
        for (char c : w) word += b2u[static_cast<uint8_t>(c)];
        encode_word(word, out);
      }
      return;
    }
    // Hugging Face Metaspace / Prepend+Replace over U+2581-marked text.
    std::string text = replace_all(seg, " ", kMarker);
    using P = Vocab::HfOptions::Prepend;
    const P p = vocab_.hf.prepend;
    const bool prepend = p == P::kUnconditional ||
                         ((p == P::kAlways || (p == P::kFirst && at_start)) && !text.starts_with(kMarker));
    if (prepend) text.insert(0, kMarker);
    if (!vocab_.hf.split_on_marker) {
      encode_word(text, out);
      return;
    }
    // split=true: each marker begins a word (SplitDelimiterBehavior::MergedWithNext).
    size_t begin = 0;
    for (size_t hit = text.find(kMarker, 1); hit != std::string::npos; hit = text.find(kMarker, hit + 1)) {
      encode_word(std::string_view(text).substr(begin, hit - begin), out);
      begin = hit;
    }
    encode_word(std::string_view(text).substr(begin), out);
  }

 private:
  struct Merge {
    int32_t rank, result;
  };
  struct Symbol {
    int32_t id;  // >= n_vocab: a piece only merges produce; -1: not in any table
    int32_t prev, next;
    uint32_t off, n;
  };
  struct Pending {
    int32_t rank, left, right, left_id, right_id, result;
  };
  struct PendingLess {
    // Lowest rank on top; ties go to the leftmost pair.
    bool operator()(const Pending& l, const Pending& r) const {
      return l.rank > r.rank || (l.rank == r.rank && l.left > r.left);
    }
  };
  using Queue = std::priority_queue<Pending, std::vector<Pending>, PendingLess>;

  static uint64_t pair_key(int32_t a, int32_t b) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
  }

  // Id of a piece in the vocabulary or among the extra pieces merges produce. GGUF files may merge
  // into strings that are not tokens (llama.cpp compares strings, so those still merge further).
  int32_t piece_id(std::string_view piece, bool create) {
    if (int32_t id = find(piece); id >= 0) return id;
    if (auto it = extra_ids_.find(piece); it != extra_ids_.end()) return it->second;
    if (!create) return -1;
    const auto id = checked_cast<int32_t>(vocab_.tokens.size() + extra_ids_.size(), "BPE pieces");
    extra_ids_.emplace(std::string(piece), id);
    return id;
  }
  int32_t lookup(std::string_view piece) const {
    if (int32_t id = find(piece); id >= 0) return id;
    const auto it = extra_ids_.find(piece);
    return it == extra_ids_.end() ? -1 : it->second;
  }

  void try_add(const std::vector<Symbol>& syms, int32_t left, int32_t right, Queue& q) const {
    if (left < 0 || right < 0 || syms[left].id < 0 || syms[right].id < 0) return;
    const auto it = merges_.find(pair_key(syms[left].id, syms[right].id));
    if (it == merges_.end()) return;
    q.push({it->second.rank, left, right, syms[left].id, syms[right].id, it->second.result});
  }

  void encode_word(std::string_view word, std::vector<int32_t>& out) const {
    if (word.empty()) return;
    if (vocab_.ignore_merges) {
      if (int32_t id = find(word); id >= 0) {
        out.push_back(id);
        return;
      }
    }
    std::vector<Symbol> syms;
    syms.reserve(word.size());
    const bool hf = vocab_.hf.enabled;
    const auto push = [&](int32_t id, size_t off, size_t n) {
      const auto idx = static_cast<int32_t>(syms.size());
      syms.push_back({id, idx - 1, idx + 1, static_cast<uint32_t>(off), static_cast<uint32_t>(n)});
    };
    for (size_t off = 0; off < word.size();) {
      const size_t len = utf8_decode(word, off).len;
      const std::string_view ch = word.substr(off, len);
      const int32_t id = lookup(ch);
      if (id >= 0 || !hf) {
        push(id, off, len);  // GGUF: unknown characters fall back after merging, as in llama.cpp
      } else if (vocab_.hf.byte_fallback && all_bytes_known(ch)) {
        for (size_t k = 0; k < len; ++k) push(byte_id(static_cast<uint8_t>(ch[k])), off + k, 1);
      } else if (vocab_.unk >= 0) {
        if (vocab_.hf.fuse_unk && !syms.empty() && syms.back().id == vocab_.unk &&
            syms.back().off + syms.back().n == off) {
          syms.back().n += static_cast<uint32_t>(len);
        } else {
          push(vocab_.unk, off, len);
        }
      }
      // Hugging Face drops characters it can represent in no way.
      off += len;
    }
    if (syms.empty()) return;
    syms.back().next = -1;

    Queue q;
    for (int32_t i = 1; i < static_cast<int32_t>(syms.size()); ++i) try_add(syms, i - 1, i, q);
    while (!q.empty()) {
      const Pending p = q.top();
      q.pop();
      Symbol& l = syms[p.left];
      Symbol& r = syms[p.right];
      if (l.n == 0 || r.n == 0 || l.next != p.right || l.id != p.left_id || r.id != p.right_id)
        continue;  // stale
      l.id = p.result;
      l.n += r.n;
      r.n = 0;
      l.next = r.next;
      if (r.next >= 0) syms[r.next].prev = p.left;
      try_add(syms, l.prev, p.left, q);
      try_add(syms, p.left, l.next, q);
    }
    const int32_t n = n_vocab();
    for (int32_t i = 0; i != -1; i = syms[i].next) {
      if (syms[i].id >= 0 && syms[i].id < n) {
        out.push_back(syms[i].id);
        continue;
      }
      // llama.cpp: a piece that is no token is spelled with single-byte tokens where they exist.
      for (char c : word.substr(syms[i].off, syms[i].n))
        if (int32_t id = find(std::string_view(&c, 1)); id >= 0) out.push_back(id);
    }
  }

  bool all_bytes_known(std::string_view ch) const {
    return std::all_of(ch.begin(), ch.end(), [&](char c) { return byte_id(static_cast<uint8_t>(c)) >= 0; });
  }

  bool byte_level_mode_;
  PreSplit split_ = PreSplit::kNone;
  std::unordered_map<uint64_t, Merge> merges_;
  PieceMap extra_ids_;
};

}  // namespace

std::unique_ptr<Tokenizer> Tokenizer::create(Vocab vocab) {
  validate(vocab);
  if (vocab.model == Vocab::Model::kBpe || vocab.hf.enabled)
    return std::make_unique<BpeTokenizer>(std::move(vocab));
  return std::make_unique<SpmTokenizer>(std::move(vocab));
}

}  // namespace shardlm
