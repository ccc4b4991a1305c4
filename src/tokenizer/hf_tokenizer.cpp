#include "tokenizer/hf_tokenizer.h"

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>

#include "core/error.h"

namespace shardlm {
namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

const std::string kMarker = "\xE2\x96\x81";  // U+2581

// The exact regexes tokenizer.json files carry for the splits pre_split implements.
const std::map<std::string, std::string>& known_split_patterns() {
  static const std::map<std::string, std::string> m = {
      {R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)", "gpt-2"},
      {R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)",
       "llama-bpe"},
      {R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)",
       "qwen2"},
  };
  return m;
}

json read_json(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail_kind(ErrorKind::kIo, path, ": cannot open");
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    fail(path, ": not valid JSON: ", e.what());
  }
}

// Reads fields with errors that name the file and the field.
class Reader {
 public:
  explicit Reader(std::string path) : path_(std::move(path)) {}

  [[noreturn]] void bad(const std::string& field, const std::string& what) const {
    fail(path_, ": ", field, ": ", what);
  }
  [[noreturn]] void unsupported(const std::string& field, const std::string& what) const {
    fail_kind(ErrorKind::kUnsupported, path_, ": ", field, ": ", what);
  }
  const json& obj(const json& j, const std::string& field) const {
    if (!j.is_object()) bad(field, cat("expected an object, found ", j.type_name()));
    return j;
  }
  std::string str(const json& parent, const char* key, const std::string& field) const {
    const auto it = parent.find(key);
    if (it == parent.end() || !it->is_string())
      bad(field + "." + key, it == parent.end() ? "missing" : cat("expected a string, found ", it->type_name()));
    return it->get<std::string>();
  }
  // Optional boolean; null counts as absent.
  std::optional<bool> opt_bool(const json& parent, const char* key, const std::string& field) const {
    const auto it = parent.find(key);
    if (it == parent.end() || it->is_null()) return std::nullopt;
    if (!it->is_boolean()) bad(field + "." + key, cat("expected a boolean, found ", it->type_name()));
    return it->get<bool>();
  }
  std::string type_of(const json& j, const std::string& field) const {
    return str(obj(j, field), "type", field);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

struct PreTokenizerInfo {
  enum class Kind { kNone, kByteLevel, kMetaspace } kind = Kind::kNone;
  std::string pre = "none";  // byte-level split name
  bool add_prefix_space = false;
  Vocab::HfOptions::Prepend prepend = Vocab::HfOptions::Prepend::kAlways;
  bool split = false;
};

void read_metaspace(const Reader& r, const json& j, const std::string& field, PreTokenizerInfo& info) {
  info.kind = PreTokenizerInfo::Kind::kMetaspace;
  const auto rep = j.find("replacement");
  if (rep != j.end() && (!rep->is_string() || rep->get<std::string>() != kMarker))
    r.unsupported(field + ".replacement", cat(rep->dump(), " (only \"\\u2581\" is supported)"));
  using P = Vocab::HfOptions::Prepend;
  if (const auto s = j.find("prepend_scheme"); s != j.end() && !s->is_null()) {
    const std::string v = s->is_string() ? s->get<std::string>() : s->dump();
    if (v == "first") info.prepend = P::kFirst;
    else if (v == "always") info.prepend = P::kAlways;
    else if (v == "never") info.prepend = P::kNever;
    else r.bad(field + ".prepend_scheme", cat("'", v, "' (valid: first, always, never)"));
  } else {
    // Files written before prepend_scheme existed say add_prefix_space, meaning "always".
    info.prepend = r.opt_bool(j, "add_prefix_space", field).value_or(true) ? P::kAlways : P::kNever;
  }
  info.split = r.opt_bool(j, "split", field).value_or(true);
}

PreTokenizerInfo read_pre_tokenizer(const Reader& r, const json& root) {
  PreTokenizerInfo info;
  const auto it = root.find("pre_tokenizer");
  if (it == root.end() || it->is_null()) return info;
  std::vector<std::pair<const json*, std::string>> steps;
  const std::string type = r.type_of(*it, "pre_tokenizer");
  if (type == "Sequence") {
    const auto list = it->find("pretokenizers");
    if (list == it->end() || !list->is_array()) r.bad("pre_tokenizer.pretokenizers", "missing or not an array");
    for (size_t i = 0; i < list->size(); ++i)
      steps.emplace_back(&(*list)[i], cat("pre_tokenizer.pretokenizers[", i, "]"));
  } else {
    steps.emplace_back(&*it, "pre_tokenizer");
  }
  bool have_split = false;
  for (const auto& [j, field] : steps) {
    const std::string t = r.type_of(*j, field);
    if (t == "Split") {
      if (have_split || info.kind != PreTokenizerInfo::Kind::kNone)
        r.unsupported(field, "a Split after another pre-tokenizer");
      const auto pat = j->find("pattern");
      if (pat == j->end() || !pat->is_object() || !pat->contains("Regex") || !(*pat)["Regex"].is_string())
        r.unsupported(field + ".pattern", "only {\"Regex\": ...} patterns are supported");
      const std::string regex = (*pat)["Regex"].get<std::string>();
      const auto known = known_split_patterns().find(regex);
      if (known == known_split_patterns().end())
        r.unsupported(field + ".pattern.Regex",
                      cat("'", regex, "' is not one of the supported splits (GPT-2, Llama 3, Qwen2)"));
      const std::string behavior = j->value("behavior", std::string("Isolated"));
      if (behavior != "Isolated") r.unsupported(field + ".behavior", cat("'", behavior, "' (only Isolated)"));
      if (j->value("invert", false)) r.unsupported(field + ".invert", "true");
      info.pre = known->second;
      have_split = true;
    } else if (t == "ByteLevel") {
      if (info.kind != PreTokenizerInfo::Kind::kNone) r.unsupported(field, "ByteLevel after another pre-tokenizer");
      info.kind = PreTokenizerInfo::Kind::kByteLevel;
      info.add_prefix_space = r.opt_bool(*j, "add_prefix_space", field).value_or(false);
      const bool use_regex = r.opt_bool(*j, "use_regex", field).value_or(true);
      if (use_regex && have_split) r.unsupported(field + ".use_regex", "true after a Split (two regex splits)");
      if (use_regex) info.pre = "gpt-2";
      if (info.add_prefix_space && have_split)
        r.unsupported(field + ".add_prefix_space", "true after a Split");
    } else if (t == "Metaspace") {
      if (info.kind != PreTokenizerInfo::Kind::kNone || have_split)
        r.unsupported(field, "Metaspace combined with other pre-tokenizers");
      read_metaspace(r, *j, field, info);
    } else {
      r.unsupported(field + ".type", cat("'", t, "' (supported: ByteLevel, Metaspace, Split, Sequence)"));
    }
  }
  if (have_split && info.kind != PreTokenizerInfo::Kind::kByteLevel)
    r.unsupported("pre_tokenizer", "a Split without ByteLevel");
  return info;
}

struct NormalizerInfo {
  bool prepend_marker = false;  // Prepend("▁")
  bool replace_space = false;   // Replace(" ", "▁")
};

NormalizerInfo read_normalizer(const Reader& r, const json& root) {
  NormalizerInfo info;
  const auto it = root.find("normalizer");
  if (it == root.end() || it->is_null()) return info;
  std::vector<std::pair<const json*, std::string>> steps;
  if (r.type_of(*it, "normalizer") == "Sequence") {
    const auto list = it->find("normalizers");
    if (list == it->end() || !list->is_array()) r.bad("normalizer.normalizers", "missing or not an array");
    for (size_t i = 0; i < list->size(); ++i) steps.emplace_back(&(*list)[i], cat("normalizer.normalizers[", i, "]"));
  } else {
    steps.emplace_back(&*it, "normalizer");
  }
  for (const auto& [j, field] : steps) {
    const std::string t = r.type_of(*j, field);
    if (t == "Prepend") {
      if (r.str(*j, "prepend", field) != kMarker) r.unsupported(field + ".prepend", "only \"\\u2581\" is supported");
      info.prepend_marker = true;
    } else if (t == "Replace") {
      const auto pat = j->find("pattern");
      const bool ok = pat != j->end() && pat->is_object() && pat->contains("String") &&
                      (*pat)["String"] == " " && r.str(*j, "content", field) == kMarker;
      if (!ok) r.unsupported(field, "only Replace(\" \" -> \"\\u2581\") is supported");
      info.replace_space = true;
    } else if (t == "NFC") {
      // Taken as the identity; see hf_tokenizer.h.
    } else {
      r.unsupported(field + ".type", cat("'", t, "' (supported: Prepend, Replace, NFC, Sequence)"));
    }
  }
  if (info.prepend_marker && !info.replace_space)
    r.unsupported("normalizer", "Prepend(\"\\u2581\") without Replace(\" \" -> \"\\u2581\")");
  return info;
}

// Token ids from the model vocabulary and added_tokens; every id in [0, n) must be named once.
void read_vocab(const Reader& r, const json& root, const json& model, Vocab& v) {
  const auto vit = model.find("vocab");
  if (vit == model.end() || !vit->is_object()) r.bad("model.vocab", "missing or not an object");
  std::vector<std::pair<int64_t, std::string>> entries;
  entries.reserve(vit->size());
  for (auto it = vit->begin(); it != vit->end(); ++it) {
    if (!it.value().is_number_integer())
      r.bad(cat("model.vocab[\"", it.key(), "\"]"), cat("expected an integer id, found ", it.value().dump()));
    entries.emplace_back(it.value().get<int64_t>(), it.key());
  }
  struct Added {
    int64_t id;
    std::string content;
    bool special;
  };
  std::vector<Added> added;
  if (const auto at = root.find("added_tokens"); at != root.end() && !at->is_null()) {
    if (!at->is_array()) r.bad("added_tokens", "not an array");
    for (size_t i = 0; i < at->size(); ++i) {
      const std::string field = cat("added_tokens[", i, "]");
      const json& a = r.obj((*at)[i], field);
      const auto id = a.find("id");
      if (id == a.end() || !id->is_number_integer()) r.bad(field + ".id", "missing or not an integer");
      added.push_back({id->get<int64_t>(), r.str(a, "content", field), r.opt_bool(a, "special", field).value_or(false)});
    }
  }
  int64_t max_id = -1;
  for (const auto& e : entries) max_id = std::max(max_id, e.first);
  for (const auto& a : added) max_id = std::max(max_id, a.id);
  if (max_id < 0) r.bad("model.vocab", "empty");
  constexpr int64_t kMaxVocab = int64_t{1} << 24;  // far above any real vocabulary; bounds the allocation
  if (max_id >= kMaxVocab) r.bad("model.vocab", cat("id ", max_id, " exceeds the limit ", kMaxVocab - 1));
  v.tokens.assign(static_cast<size_t>(max_id + 1), std::string());
  v.types.assign(v.tokens.size(), TokenType::kNormal);
  std::vector<bool> named(v.tokens.size(), false);
  for (const auto& [id, text] : entries) {
    if (id < 0) r.bad(cat("model.vocab[\"", text, "\"]"), cat("negative id ", id));
    if (named[id]) r.bad(cat("model.vocab[\"", text, "\"]"), cat("id ", id, " also belongs to '", v.tokens[id], "'"));
    named[id] = true;
    v.tokens[id] = text;
  }
  for (size_t i = 0; i < added.size(); ++i) {
    const Added& a = added[i];
    const std::string field = cat("added_tokens[", i, "]");
    if (a.id < 0) r.bad(field + ".id", cat("negative id ", a.id));
    if (a.content.empty()) r.bad(field + ".content", "empty");
    if (named[a.id] && v.tokens[a.id] != a.content)
      r.bad(field, cat("id ", a.id, " is '", a.content, "' here but '", v.tokens[a.id], "' in model.vocab"));
    named[a.id] = true;
    v.tokens[a.id] = a.content;
    v.types[a.id] = a.special ? TokenType::kControl : TokenType::kUserDefined;
  }
  for (size_t id = 0; id < named.size(); ++id)
    if (!named[id]) r.bad("model.vocab", cat("no token has id ", id, " (ids must be 0..", max_id, " without gaps)"));
}

void read_merges(const Reader& r, const json& model, Vocab& v) {
  const auto mit = model.find("merges");
  if (mit == model.end() || mit->is_null()) return;
  if (!mit->is_array()) r.bad("model.merges", "not an array");
  v.merges.reserve(mit->size());
  for (size_t i = 0; i < mit->size(); ++i) {
    const json& m = (*mit)[i];
    const std::string field = cat("model.merges[", i, "]");
    std::string a, b;
    if (m.is_string()) {
      const std::string s = m.get<std::string>();
      const size_t sp = s.find(' ');
      if (sp == std::string::npos || s.find(' ', sp + 1) != std::string::npos)
        r.bad(field, cat("'", s, "' is not two pieces separated by one space"));
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      a = m[0].get<std::string>();
      b = m[1].get<std::string>();
    } else {
      r.bad(field, cat("expected \"a b\" or [\"a\", \"b\"], found ", m.dump()));
    }
    // Vocab::merges keeps llama.cpp's "a b" form, split at the first space after the first byte.
    if (a.empty() || b.empty() || a.find(' ', 1) != std::string::npos)
      r.unsupported(field, cat("pieces '", a, "' and '", b, "' cannot be stored as \"a b\""));
    v.merges.push_back(a + " " + b);
  }
}

int32_t find_token(const Vocab& v, const std::string& text) {
  for (size_t i = 0; i < v.tokens.size(); ++i)
    if (v.tokens[i] == text) return static_cast<int32_t>(i);
  return -1;
}

// add_bos / add_eos from TemplateProcessing's "single" template: special tokens before and after $A.
void read_post_processor(const Reader& r, const json& root, Vocab& v) {
  v.add_bos = false;
  v.add_eos = false;
  const auto it = root.find("post_processor");
  if (it == root.end() || it->is_null()) return;
  std::vector<std::pair<const json*, std::string>> steps;
  if (r.type_of(*it, "post_processor") == "Sequence") {
    const auto list = it->find("processors");
    if (list == it->end() || !list->is_array()) r.bad("post_processor.processors", "missing or not an array");
    for (size_t i = 0; i < list->size(); ++i) steps.emplace_back(&(*list)[i], cat("post_processor.processors[", i, "]"));
  } else {
    steps.emplace_back(&*it, "post_processor");
  }
  for (const auto& [j, field] : steps) {
    if (r.type_of(*j, field) != "TemplateProcessing") continue;  // ByteLevel post-processing adds no ids
    const auto single = j->find("single");
    if (single == j->end() || !single->is_array()) r.bad(field + ".single", "missing or not an array");
    bool seen_sequence = false;
    for (size_t i = 0; i < single->size(); ++i) {
      const json& piece = (*single)[i];
      const std::string pf = cat(field, ".single[", i, "]");
      if (piece.contains("Sequence")) {
        seen_sequence = true;
        continue;
      }
      if (!piece.contains("SpecialToken") || !piece["SpecialToken"].is_object())
        r.bad(pf, "expected Sequence or SpecialToken");
      const std::string name = r.str(piece["SpecialToken"], "id", pf + ".SpecialToken");
      const int32_t id = find_token(v, name);
      if (id < 0) r.bad(pf, cat("special token '", name, "' is not in the vocabulary"));
      if (!seen_sequence) {
        v.add_bos = true;
        v.bos = id;
      } else {
        v.add_eos = true;
        v.eos = id;
      }
    }
  }
}

// tokenizer_config.json: "<s>" or {"content": "<s>", ...}; null or absent leaves `id` unchanged.
void config_token(const Reader& r, const json& cfg, const char* key, const Vocab& v, int32_t& id) {
  const auto it = cfg.find(key);
  if (it == cfg.end() || it->is_null()) return;
  std::string text;
  if (it->is_string()) text = it->get<std::string>();
  else if (it->is_object()) text = r.str(*it, "content", key);
  else r.bad(key, cat("expected a string or an object, found ", it->type_name()));
  id = find_token(v, text);
  if (id < 0) r.bad(key, cat("'", text, "' is not in the vocabulary"));
}

}  // namespace

Vocab vocab_from_hf_tokenizer(const std::string& tokenizer_json_path,
                              const std::string& tokenizer_config_path_or_empty) {
  const json root = read_json(tokenizer_json_path);
  const Reader r(tokenizer_json_path);
  r.obj(root, "(root)");
  const auto mit = root.find("model");
  if (mit == root.end()) r.bad("model", "missing");
  const json& model = r.obj(*mit, "model");
  if (const auto t = model.find("type"); t != model.end() && *t != "BPE")
    r.unsupported("model.type", cat(t->dump(), " (only BPE is supported)"));
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"})
    if (const auto it = model.find(key); it != model.end() && !it->is_null() && *it != "")
      r.unsupported(cat("model.", key), it->dump());

  Vocab v;
  v.hf.enabled = true;
  read_vocab(r, root, model, v);
  read_merges(r, model, v);
  v.hf.byte_fallback = r.opt_bool(model, "byte_fallback", "model").value_or(false);
  v.hf.fuse_unk = r.opt_bool(model, "fuse_unk", "model").value_or(false);
  v.ignore_merges = r.opt_bool(model, "ignore_merges", "model").value_or(false);
  if (const auto u = model.find("unk_token"); u != model.end() && !u->is_null()) {
    if (!u->is_string()) r.bad("model.unk_token", "not a string");
    v.unk = find_token(v, u->get<std::string>());
    if (v.unk < 0) r.bad("model.unk_token", cat("'", u->get<std::string>(), "' is not in the vocabulary"));
  }

  PreTokenizerInfo pre = read_pre_tokenizer(r, root);
  const NormalizerInfo norm = read_normalizer(r, root);
  using K = PreTokenizerInfo::Kind;
  using P = Vocab::HfOptions::Prepend;
  json cfg;
  std::optional<Reader> cr;
  if (!tokenizer_config_path_or_empty.empty()) {
    cfg = read_json(tokenizer_config_path_or_empty);
    cr.emplace(tokenizer_config_path_or_empty);
    cr->obj(cfg, "(root)");
  }
  if (pre.kind == K::kMetaspace && cr) {
    if (const std::optional<bool> aps = cr->opt_bool(cfg, "add_prefix_space", "(root)")) {
      const bool legacy = cr->opt_bool(cfg, "legacy", "(root)").value_or(true);
      pre.prepend = *aps ? (legacy ? P::kAlways : P::kFirst) : P::kNever;
    }
  }
  if (pre.kind == K::kByteLevel) {
    if (norm.replace_space) r.unsupported("normalizer", "Replace(\" \" -> \"\\u2581\") with a ByteLevel pre-tokenizer");
    v.model = Vocab::Model::kBpe;
    v.pre = pre.pre;
    v.hf.add_prefix_space = pre.add_prefix_space;
    v.add_space_prefix = false;
  } else if (pre.kind == K::kMetaspace) {
    if (norm.replace_space) r.unsupported("normalizer", "Replace(\" \" -> \"\\u2581\") with a Metaspace pre-tokenizer");
    v.model = Vocab::Model::kSpm;
    v.hf.prepend = pre.prepend;
    v.hf.split_on_marker = pre.split;
  } else if (norm.replace_space) {
    v.model = Vocab::Model::kSpm;
    v.hf.prepend = norm.prepend_marker ? P::kUnconditional : P::kNever;
  } else {
    r.unsupported("pre_tokenizer", "neither ByteLevel, Metaspace nor a Replace(\" \" -> \"\\u2581\") normalizer");
  }
  if (v.model == Vocab::Model::kSpm) {
    // The decoders that undo the prefix (Metaspace, or Strip after Prepend) drop one leading space.
    v.add_space_prefix = v.hf.prepend != P::kNever;
    if (v.hf.byte_fallback)
      for (size_t i = 0; i < v.tokens.size(); ++i) {
        const std::string& t = v.tokens[i];
        if (v.types[i] == TokenType::kNormal && t.size() == 6 && t.starts_with("<0x") && t[5] == '>' &&
            std::isxdigit(static_cast<unsigned char>(t[3])) && std::isxdigit(static_cast<unsigned char>(t[4])))
          v.types[i] = TokenType::kByte;
      }
  }
  if (v.unk >= 0 && v.types[v.unk] == TokenType::kNormal) v.types[v.unk] = TokenType::kUnknown;

  read_post_processor(r, root, v);
  if (v.bos < 0) v.bos = std::max(find_token(v, "<s>"), find_token(v, "<|begin_of_text|>"));
  if (v.eos < 0) v.eos = std::max(find_token(v, "</s>"), find_token(v, "<|endoftext|>"));
  if (cr) {
    config_token(*cr, cfg, "bos_token", v, v.bos);
    config_token(*cr, cfg, "eos_token", v, v.eos);
    config_token(*cr, cfg, "unk_token", v, v.unk);
    config_token(*cr, cfg, "pad_token", v, v.pad);
    if (auto b = cr->opt_bool(cfg, "add_bos_token", "(root)")) v.add_bos = *b;
    if (auto e = cr->opt_bool(cfg, "add_eos_token", "(root)")) v.add_eos = *e;
  }
  if (v.add_bos && v.bos < 0) r.bad("post_processor", "adds a BOS token but none is known");
  return v;
}

std::unique_ptr<Tokenizer> load_hf_tokenizer(const std::string& dir_or_json_path) {
  const fs::path p(dir_or_json_path);
  std::error_code ec;
  const bool is_dir = fs::is_directory(p, ec);
  const fs::path json_path = is_dir ? p / "tokenizer.json" : p;
  if (!fs::is_regular_file(json_path, ec))
    fail_kind(ErrorKind::kIo, is_dir ? cat("no tokenizer.json in ", dir_or_json_path)
                                     : cat(dir_or_json_path, ": no such file"));
  const fs::path cfg = json_path.parent_path() / "tokenizer_config.json";
  return Tokenizer::create(
      vocab_from_hf_tokenizer(json_path.string(), fs::is_regular_file(cfg, ec) ? cfg.string() : ""));
}

}  // namespace shardlm
