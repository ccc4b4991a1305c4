// Jinja subset for chat templates: lexer, parser and tree-walking renderer in one translation unit,
// because nothing outside needs the tree and the pieces only make sense together.
//
// Reference behaviour is Jinja2 3.1 as transformers sets it up (ImmutableSandboxedEnvironment,
// trim_blocks, lstrip_blocks, loopcontrols). Values follow Python semantics where templates can see
// the difference: str() of lists/None/floats, 1 == 1.0, floor division and modulo signs, code-point
// string length and slicing.
#include "tokenizer/chat_template.h"
#include "tokenizer/unicode.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <ctime>
#include <cstdio>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string_view>
#include <unordered_map>
#include <utility>

#include "core/error.h"

namespace shardlm {
namespace {

// Limits that stop hostile or broken templates; real chat templates stay far below them.
constexpr size_t kMaxOutputBytes = size_t{32} << 20;
constexpr int64_t kMaxLoopIterations = 250'000;
constexpr int kMaxParseDepth = 200;
constexpr int kMaxCallDepth = 64;
constexpr int kMaxEvalDepth = 1500;  // nested evaluation frames across macro calls
constexpr int64_t kMaxRange = 100'000;  // Jinja2's sandbox MAX_RANGE

// ------------------------------------------------------------------------------------------------
// UTF-8: Python strings are code-point sequences, so length, slicing and case mapping work on code
// points. Invalid bytes map to lone surrogates U+DC80..U+DCFF (Python's surrogateescape) so that
// decoding and re-encoding gives back the same bytes.

std::u32string decode_utf8(std::string_view s) {
  std::u32string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    int len = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    char32_t cp = len == 1 ? c : len == 2 ? (c & 0x1F) : len == 3 ? (c & 0x0F) : (c & 0x07);
    bool ok = len > 0 && i + static_cast<size_t>(len) <= s.size();
    for (int k = 1; ok && k < len; ++k) {
      const auto cc = static_cast<unsigned char>(s[i + static_cast<size_t>(k)]);
      if ((cc >> 6) != 2) ok = false;
      cp = (cp << 6) | (cc & 0x3F);
    }
    if (ok && ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
               cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)))
      ok = false;
    if (!ok) {
      out.push_back(0xDC00 + c);
      ++i;
    } else {
      out.push_back(cp);
      i += static_cast<size_t>(len);
    }
  }
  return out;
}

void append_utf8(std::string& out, char32_t cp) {
  // Lone low surrogates U+DC80..U+DCFF carry raw bytes that were not valid UTF-8 (Python's
  // surrogateescape), so strings with invalid bytes render back byte for byte.
  if (cp >= 0xDC80 && cp <= 0xDCFF) {
    out.push_back(static_cast<char>(cp - 0xDC00));
    return;
  }
  utf8_append(out, static_cast<uint32_t>(cp));
}

std::string encode_utf8(std::u32string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char32_t c : s) append_utf8(out, c);
  return out;
}

// Python's str.isspace().
bool is_py_space(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 ||
         c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
         c == 0x205F || c == 0x3000;
}

// Simple case mapping for the scripts chat templates meet (Latin-1, Greek, Cyrillic); full Unicode
// tables are not worth their size here.
char32_t to_upper_cp(char32_t c) {
  if (c >= 'a' && c <= 'z') return c - 32;
  if (c >= 0xE0 && c <= 0xFE && c != 0xF7) return c - 32;
  if (c == 0xFF) return 0x178;
  if (c >= 0x3B1 && c <= 0x3C9 && c != 0x3C2) return c - 32;
  if (c >= 0x430 && c <= 0x44F) return c - 32;
  if (c >= 0x450 && c <= 0x45F) return c - 80;
  return c;
}
char32_t to_lower_cp(char32_t c) {
  if (c >= 'A' && c <= 'Z') return c + 32;
  if (c >= 0xC0 && c <= 0xDE && c != 0xD7) return c + 32;
  if (c == 0x178) return 0xFF;
  if (c >= 0x391 && c <= 0x3A9 && c != 0x3A2) return c + 32;
  if (c >= 0x410 && c <= 0x42F) return c + 32;
  if (c >= 0x400 && c <= 0x40F) return c + 80;
  return c;
}
bool is_cased_letter(char32_t c) { return to_upper_cp(c) != c || to_lower_cp(c) != c; }

std::string map_case(std::string_view s, bool upper) {
  std::u32string u = decode_utf8(s);
  for (auto& c : u) c = upper ? to_upper_cp(c) : to_lower_cp(c);
  return encode_utf8(u);
}

// ------------------------------------------------------------------------------------------------
// Values

struct Value;
using ValueList = std::vector<Value>;
struct DictData;
struct Callable;
class Renderer;

struct Value {
  enum class Kind { kUndefined, kNone, kBool, kInt, kFloat, kString, kList, kDict, kCallable };
  Kind kind = Kind::kUndefined;
  bool is_tuple = false;      // a list that prints as a Python tuple
  bool is_namespace = false;  // a namespace(): a dict that `set ns.attr = ...` may change
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string s;  // string payload; for undefined values, the name used in error messages
  std::shared_ptr<const ValueList> list;
  std::shared_ptr<DictData> dict;
  std::shared_ptr<const Callable> fn;

  static Value undefined(std::string hint = {}) {
    Value v;
    v.s = std::move(hint);
    return v;
  }
  static Value none() {
    Value v;
    v.kind = Kind::kNone;
    return v;
  }
  static Value boolean(bool x) {
    Value v;
    v.kind = Kind::kBool;
    v.b = x;
    return v;
  }
  static Value integer(int64_t x) {
    Value v;
    v.kind = Kind::kInt;
    v.i = x;
    return v;
  }
  static Value number(double x) {
    Value v;
    v.kind = Kind::kFloat;
    v.f = x;
    return v;
  }
  static Value string(std::string x) {
    Value v;
    v.kind = Kind::kString;
    v.s = std::move(x);
    return v;
  }
  static Value make_list(ValueList items, bool tuple = false) {
    Value v;
    v.kind = Kind::kList;
    v.is_tuple = tuple;
    v.list = std::make_shared<const ValueList>(std::move(items));
    return v;
  }
  static Value make_dict(std::shared_ptr<DictData> d) {
    Value v;
    v.kind = Kind::kDict;
    v.dict = std::move(d);
    return v;
  }
  static Value callable(std::shared_ptr<const Callable> c) {
    Value v;
    v.kind = Kind::kCallable;
    v.fn = std::move(c);
    return v;
  }

  bool is_undefined() const { return kind == Kind::kUndefined; }
  bool is_string() const { return kind == Kind::kString; }
  bool is_number() const { return kind == Kind::kInt || kind == Kind::kFloat || kind == Kind::kBool; }
  double as_double() const {
    return kind == Kind::kFloat ? f : kind == Kind::kBool ? (b ? 1.0 : 0.0) : static_cast<double>(i);
  }
  int64_t as_int() const { return kind == Kind::kBool ? (b ? 1 : 0) : i; }
  const ValueList& items() const { return *list; }
};

bool equals(const Value& a, const Value& b);

struct DictData {
  std::vector<std::pair<Value, Value>> items;
  const Value* find(const Value& key) const {
    for (const auto& [k, v] : items)
      if (equals(k, key)) return &v;
    return nullptr;
  }
  const Value* find(std::string_view key) const {
    for (const auto& [k, v] : items)
      if (k.is_string() && k.s == key) return &v;
    return nullptr;
  }
  void set(Value key, Value value) {
    for (auto& [k, v] : items)
      if (equals(k, key)) {
        v = std::move(value);
        return;
      }
    items.emplace_back(std::move(key), std::move(value));
  }
};

struct CallArgs {
  std::vector<Value> pos;
  std::vector<std::pair<std::string, Value>> kw;
  int line = 0;
};

struct Callable {
  std::string name;
  std::function<Value(Renderer&, CallArgs&)> call;
};

const char* type_name(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kUndefined: return "Undefined";
    case Value::Kind::kNone: return "NoneType";
    case Value::Kind::kBool: return "bool";
    case Value::Kind::kInt: return "int";
    case Value::Kind::kFloat: return "float";
    case Value::Kind::kString: return "str";
    case Value::Kind::kList: return v.is_tuple ? "tuple" : "list";
    case Value::Kind::kDict: return v.is_namespace ? "Namespace" : "dict";
    case Value::Kind::kCallable: return "function";
  }
  return "?";
}

bool truthy(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kUndefined:
    case Value::Kind::kNone: return false;
    case Value::Kind::kBool: return v.b;
    case Value::Kind::kInt: return v.i != 0;
    case Value::Kind::kFloat: return v.f != 0.0;
    case Value::Kind::kString: return !v.s.empty();
    case Value::Kind::kList: return !v.list->empty();
    case Value::Kind::kDict: return v.is_namespace || !v.dict->items.empty();
    case Value::Kind::kCallable: return true;
  }
  return false;
}

bool equals(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) {
    if (a.kind == Value::Kind::kFloat || b.kind == Value::Kind::kFloat)
      return a.as_double() == b.as_double();
    return a.as_int() == b.as_int();
  }
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case Value::Kind::kUndefined:
    case Value::Kind::kNone: return true;
    case Value::Kind::kString: return a.s == b.s;
    case Value::Kind::kList:
      if (a.is_tuple != b.is_tuple || a.list->size() != b.list->size()) return false;
      for (size_t k = 0; k < a.list->size(); ++k)
        if (!equals((*a.list)[k], (*b.list)[k])) return false;
      return true;
    case Value::Kind::kDict: {
      if (a.is_namespace || b.is_namespace) return a.dict == b.dict;
      if (a.dict->items.size() != b.dict->items.size()) return false;
      for (const auto& [k, v] : a.dict->items) {
        const Value* o = b.dict->find(k);
        if (!o || !equals(v, *o)) return false;
      }
      return true;
    }
    case Value::Kind::kCallable: return a.fn == b.fn;
    default: return false;
  }
}

// Python's float.__repr__: shortest round-trip digits, fixed notation for exponents in [-4, 16).
std::string py_float_repr(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v < 0 ? "-inf" : "inf";
  if (v == 0) return std::signbit(v) ? "-0.0" : "0.0";
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
  std::string sci(buf, res.ptr);
  std::string sign;
  if (sci[0] == '-') {
    sign = "-";
    sci.erase(0, 1);
  }
  const size_t epos = sci.find('e');
  const int exp = std::stoi(sci.substr(epos + 1));
  std::string digits;
  for (char c : sci.substr(0, epos))
    if (c != '.') digits.push_back(c);
  if (exp >= -4 && exp < 16) {
    if (exp >= 0) {
      auto ip = static_cast<size_t>(exp) + 1;
      if (digits.size() < ip) digits.append(ip - digits.size(), '0');
      std::string frac = digits.substr(ip);
      return sign + digits.substr(0, ip) + "." + (frac.empty() ? "0" : frac);
    }
    return sign + "0." + std::string(static_cast<size_t>(-exp - 1), '0') + digits;
  }
  std::string out = sign + digits.substr(0, 1);
  if (digits.size() > 1) out += "." + digits.substr(1);
  const int ae = exp < 0 ? -exp : exp;
  out += exp < 0 ? "e-" : "e+";
  if (ae < 10) out += "0";
  out += std::to_string(ae);
  return out;
}

std::string py_str_repr(const std::string& s) {
  const bool has_single = s.find('\'') != std::string::npos;
  const bool has_double = s.find('"') != std::string::npos;
  const char q = has_single && !has_double ? '"' : '\'';
  std::string out(1, q);
  for (char32_t c : decode_utf8(s)) {
    if (c == '\\') {
      out += "\\\\";
    } else if (c == static_cast<char32_t>(q)) {
      out += '\\';
      out += q;
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20 || (c >= 0x7F && c <= 0xA0) || c == 0xAD) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", static_cast<unsigned>(c));
      out += buf;
    } else {
      append_utf8(out, c);
    }
  }
  out += q;
  return out;
}

std::string to_str(const Value& v);

std::string py_repr(const Value& v) {
  if (v.is_string()) return py_str_repr(v.s);
  if (v.is_undefined()) return "Undefined";
  return to_str(v);
}

// Python's str(), which is what {{ }} prints.
std::string to_str(const Value& v) {
  switch (v.kind) {
    case Value::Kind::kUndefined: return "";
    case Value::Kind::kNone: return "None";
    case Value::Kind::kBool: return v.b ? "True" : "False";
    case Value::Kind::kInt: return std::to_string(v.i);
    case Value::Kind::kFloat: return py_float_repr(v.f);
    case Value::Kind::kString: return v.s;
    case Value::Kind::kList: {
      std::string out = v.is_tuple ? "(" : "[";
      for (size_t k = 0; k < v.list->size(); ++k) {
        if (k) out += ", ";
        out += py_repr((*v.list)[k]);
      }
      if (v.is_tuple && v.list->size() == 1) out += ",";
      out += v.is_tuple ? ")" : "]";
      return out;
    }
    case Value::Kind::kDict: {
      std::string out = v.is_namespace ? "<Namespace {" : "{";
      bool first = true;
      for (const auto& [k, x] : v.dict->items) {
        if (!first) out += ", ";
        first = false;
        out += py_repr(k) + ": " + py_repr(x);
      }
      out += v.is_namespace ? "}>" : "}";
      return out;
    }
    case Value::Kind::kCallable: return "<function " + v.fn->name + ">";
  }
  return "";
}

// json.dumps(x, ensure_ascii=False, indent=..., separators=..., sort_keys=...) as transformers'
// tojson filter calls it.
struct JsonStyle {
  bool pretty = false;
  std::string indent;
  std::string item_sep = ", ";
  std::string key_sep = ": ";
  bool sort_keys = false;
  bool ensure_ascii = false;
};

void json_string(std::string& out, const std::string& s, bool ensure_ascii) {
  out += '"';
  for (char32_t c : decode_utf8(s)) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20 || (ensure_ascii && c >= 0x80)) {
          char buf[16];
          if (c >= 0x10000) {
            const char32_t v = c - 0x10000;
            std::snprintf(buf, sizeof buf, "\\u%04x\\u%04x", static_cast<unsigned>(0xD800 + (v >> 10)),
                          static_cast<unsigned>(0xDC00 + (v & 0x3FF)));
          } else {
            std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(c));
          }
          out += buf;
        } else {
          append_utf8(out, c);
        }
    }
  }
  out += '"';
}

void to_json(std::string& out, const Value& v, const JsonStyle& st, int level, int line);

std::string json_key(const Value& k, int line) {
  switch (k.kind) {
    case Value::Kind::kString: return k.s;
    case Value::Kind::kInt: return std::to_string(k.i);
    case Value::Kind::kFloat: return py_float_repr(k.f);
    case Value::Kind::kBool: return k.b ? "true" : "false";
    case Value::Kind::kNone: return "null";
    default: fail("chat template error at line ", line, ": tojson: keys must be str, int, float, bool or None, not ", type_name(k));
  }
}

void json_newline(std::string& out, const JsonStyle& st, int level) {
  out += '\n';
  for (int k = 0; k < level; ++k) out += st.indent;
}

void to_json(std::string& out, const Value& v, const JsonStyle& st, int level, int line) {
  if (level > kMaxParseDepth) fail("chat template error at line ", line, ": tojson: value nested too deeply");
  switch (v.kind) {
    case Value::Kind::kNone: out += "null"; return;
    case Value::Kind::kBool: out += v.b ? "true" : "false"; return;
    case Value::Kind::kInt: out += std::to_string(v.i); return;
    case Value::Kind::kFloat:
      out += std::isnan(v.f) ? "NaN" : std::isinf(v.f) ? (v.f < 0 ? "-Infinity" : "Infinity") : py_float_repr(v.f);
      return;
    case Value::Kind::kString: json_string(out, v.s, st.ensure_ascii); return;
    case Value::Kind::kList: {
      if (v.list->empty()) {
        out += "[]";
        return;
      }
      out += '[';
      for (size_t k = 0; k < v.list->size(); ++k) {
        if (k) out += st.item_sep;
        if (st.pretty) json_newline(out, st, level + 1);
        to_json(out, (*v.list)[k], st, level + 1, line);
      }
      if (st.pretty) json_newline(out, st, level);
      out += ']';
      return;
    }
    case Value::Kind::kDict: {
      if (v.dict->items.empty()) {
        out += "{}";
        return;
      }
      std::vector<std::pair<std::string, const Value*>> entries;
      for (const auto& [k, x] : v.dict->items) entries.emplace_back(json_key(k, line), &x);
      if (st.sort_keys)
        std::stable_sort(entries.begin(), entries.end(),
                         [](const auto& a, const auto& b) { return a.first < b.first; });
      out += '{';
      bool first = true;
      for (const auto& [k, x] : entries) {
        if (!first) out += st.item_sep;
        first = false;
        if (st.pretty) json_newline(out, st, level + 1);
        json_string(out, k, st.ensure_ascii);
        out += st.key_sep;
        to_json(out, *x, st, level + 1, line);
      }
      if (st.pretty) json_newline(out, st, level);
      out += '}';
      return;
    }
    default:
      fail("chat template error at line ", line, ": Object of type ", type_name(v), " is not JSON serializable");
  }
}

template <typename Json>
Value from_json(const Json& j, int depth = 0) {
  if (depth > kMaxParseDepth) fail("chat template context: JSON nested too deeply");
  switch (j.type()) {
    case Json::value_t::null: return Value::none();
    case Json::value_t::boolean: return Value::boolean(j.template get<bool>());
    case Json::value_t::number_integer: return Value::integer(j.template get<int64_t>());
    case Json::value_t::number_unsigned: {
      const auto u = j.template get<uint64_t>();
      if (u > static_cast<uint64_t>(INT64_MAX)) return Value::number(static_cast<double>(u));
      return Value::integer(static_cast<int64_t>(u));
    }
    case Json::value_t::number_float: return Value::number(j.template get<double>());
    case Json::value_t::string: return Value::string(j.template get<std::string>());
    case Json::value_t::array: {
      ValueList items;
      for (const auto& e : j) items.push_back(from_json(e, depth + 1));
      return Value::make_list(std::move(items));
    }
    case Json::value_t::object: {
      auto d = std::make_shared<DictData>();
      for (auto it = j.begin(); it != j.end(); ++it)
        d->items.emplace_back(Value::string(it.key()), from_json(it.value(), depth + 1));
      return Value::make_dict(std::move(d));
    }
    default: fail("chat template context: unsupported JSON value (binary or discarded)");
  }
}

// ------------------------------------------------------------------------------------------------
// Lexer

enum class Tok { kText, kVarBegin, kVarEnd, kBlockBegin, kBlockEnd, kName, kString, kInt, kFloat, kOp, kEof };

struct Token {
  Tok kind;
  std::string text;  // text data, name, decoded string literal or operator
  int64_t ival = 0;
  double fval = 0;
  int line = 1;
  int col = 1;
};

class Lexer {
 public:
  explicit Lexer(const std::string& source) {
    // Jinja2 normalizes every newline form to \n and drops one trailing newline
    // (keep_trailing_newline=False) before lexing.
    src_.reserve(source.size());
    for (size_t k = 0; k < source.size(); ++k) {
      if (source[k] == '\r') {
        src_ += '\n';
        if (k + 1 < source.size() && source[k + 1] == '\n') ++k;
      } else {
        src_ += source[k];
      }
    }
    if (!src_.empty() && src_.back() == '\n') src_.pop_back();
  }

  std::vector<Token> run() {
    while (pos_ < src_.size()) lex_data();
    push(Tok::kEof, "", pos_);
    return std::move(toks_);
  }

 private:
  [[noreturn]] void error_at(size_t p, const std::string& msg) const {
    auto [l, c] = line_col(p);
    fail("chat template syntax error at line ", l, ", column ", c, ": ", msg);
  }
  std::pair<int, int> line_col(size_t p) const {
    int l = 1, c = 1;
    for (size_t k = 0; k < p && k < src_.size(); ++k) {
      if (src_[k] == '\n') {
        ++l;
        c = 1;
      } else if ((static_cast<unsigned char>(src_[k]) & 0xC0) != 0x80) {
        ++c;
      }
    }
    return {l, c};
  }
  void push(Tok kind, std::string text, size_t p) {
    Token t;
    t.kind = kind;
    t.text = std::move(text);
    // Line/column by incremental scan: positions only move forward.
    while (lc_pos_ < p && lc_pos_ < src_.size()) {
      if (src_[lc_pos_] == '\n') {
        ++lc_line_;
        lc_col_ = 1;
      } else if ((static_cast<unsigned char>(src_[lc_pos_]) & 0xC0) != 0x80) {
        ++lc_col_;
      }
      ++lc_pos_;
    }
    t.line = lc_line_;
    t.col = lc_col_;
    toks_.push_back(std::move(t));
  }
  bool starts(size_t p, std::string_view s) const { return src_.compare(p, s.size(), s) == 0; }
  static bool is_ws(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v'; }
  size_t skip_ws(size_t p) const {
    while (p < src_.size() && is_ws(src_[p])) ++p;
    return p;
  }

  // Applies `{%-`/`{{-` (strip all whitespace before) or lstrip_blocks (strip spaces and tabs back to
  // the start of the line) to the text that precedes a tag.
  void emit_text(size_t begin, size_t end, char sign, bool lstrip_kind) {
    std::string_view text(src_.data() + begin, end - begin);
    if (sign == '-') {
      while (!text.empty() && is_ws(text.back())) text.remove_suffix(1);
    } else if (sign != '+' && lstrip_kind) {
      const size_t nl = text.rfind('\n');
      const size_t l = nl == std::string_view::npos ? 0 : nl + 1;
      const bool line_start = l > 0 || begin == 0 || src_[begin - 1] == '\n';
      if (line_start && l < text.size() &&
          std::all_of(text.begin() + static_cast<std::ptrdiff_t>(l), text.end(), [](char c) { return is_ws(c); }))
        text = text.substr(0, l);
    }
    if (!text.empty()) push(Tok::kText, std::string(text), begin);
  }

  // After a block or comment end: `-%}` eats all following whitespace, a plain `%}` eats one newline
  // (trim_blocks), `+%}` keeps everything.
  size_t after_block_end(size_t p, char sign) const {
    if (sign == '-') return skip_ws(p);
    if (sign != '+' && p < src_.size() && src_[p] == '\n') return p + 1;
    return p;
  }

  void lex_data() {
    size_t p = pos_;
    while (true) {
      p = src_.find('{', p);
      if (p == std::string::npos || p + 1 >= src_.size()) {
        emit_text(pos_, src_.size(), 0, false);
        pos_ = src_.size();
        return;
      }
      const char n = src_[p + 1];
      if (n == '{' || n == '%' || n == '#') break;
      ++p;
    }
    const char kind = src_[p + 1];
    const char sign = p + 2 < src_.size() && (src_[p + 2] == '-' || src_[p + 2] == '+') ? src_[p + 2] : 0;
    emit_text(pos_, p, sign == '+' && kind == '{' ? 0 : sign, kind != '{');
    size_t q = p + 2 + (sign ? 1 : 0);
    if (kind == '#') {
      const size_t e = src_.find("#}", q);
      if (e == std::string::npos) error_at(p, "missing end of comment tag '#}'");
      const char esign = e > q && (src_[e - 1] == '-' || src_[e - 1] == '+') ? src_[e - 1] : 0;
      pos_ = after_block_end(e + 2, esign);
      return;
    }
    if (kind == '%' && try_raw(p, q)) return;
    push(kind == '{' ? Tok::kVarBegin : Tok::kBlockBegin, "", p);
    pos_ = lex_tag(q, kind == '{', p);
  }

  // {% raw %}...{% endraw %}: the body is text, but lstrip_blocks and `-` still apply around endraw.
  bool try_raw(size_t p, size_t q) {
    size_t r = skip_ws(q);
    if (!starts(r, "raw")) return false;
    r = skip_ws(r + 3);
    size_t body;
    if (starts(r, "-%}")) {
      body = skip_ws(r + 3);
    } else if (starts(r, "%}")) {
      body = r + 2;
    } else {
      return false;
    }
    size_t search = body;
    while (true) {
      const size_t e = src_.find("{%", search);
      if (e == std::string::npos) error_at(p, "missing '{% endraw %}' for this raw block");
      size_t t = e + 2;
      const char esign = t < src_.size() && (src_[t] == '-' || src_[t] == '+') ? src_[t] : 0;
      if (esign) ++t;
      t = skip_ws(t);
      if (!starts(t, "endraw")) {
        search = e + 2;
        continue;
      }
      t = skip_ws(t + 6);
      char endsign = 0;
      if (starts(t, "-%}") || starts(t, "+%}")) {
        endsign = src_[t];
        t += 3;
      } else if (starts(t, "%}")) {
        t += 2;
      } else {
        error_at(e, "expected '%}' after endraw");
      }
      emit_text(body, e, esign, true);
      pos_ = after_block_end(t, endsign);
      return true;
    }
  }

  // Lexes expression tokens up to the tag's end; returns the position after it. Ends are only
  // recognised outside brackets so that `{{ {'a': {'b': 1}} }}` works as in Jinja2.
  size_t lex_tag(size_t p, bool is_var, size_t tag_start) {
    std::vector<char> brackets;
    while (true) {
      p = skip_ws(p);
      if (p >= src_.size())
        error_at(tag_start, is_var ? "unexpected end of template, expected '}}'" : "unexpected end of template, expected '%}'");
      if (brackets.empty()) {
        if (is_var) {
          if (starts(p, "-}}")) {
            push(Tok::kVarEnd, "", p);
            return skip_ws(p + 3);
          }
          if (starts(p, "}}")) {
            push(Tok::kVarEnd, "", p);
            return p + 2;
          }
        } else {
          if (starts(p, "-%}") || starts(p, "+%}")) {
            push(Tok::kBlockEnd, "", p);
            return after_block_end(p + 3, src_[p]);
          }
          if (starts(p, "%}")) {
            push(Tok::kBlockEnd, "", p);
            return after_block_end(p + 2, 0);
          }
        }
      }
      const char c = src_[p];
      if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
        size_t e = p;
        while (e < src_.size() && (std::isalnum(static_cast<unsigned char>(src_[e])) || src_[e] == '_')) ++e;
        push(Tok::kName, src_.substr(p, e - p), p);
        p = e;
      } else if (std::isdigit(static_cast<unsigned char>(c))) {
        p = lex_number(p);
      } else if (c == '\'' || c == '"') {
        p = lex_string(p);
      } else {
        static constexpr std::string_view kOps2[] = {"//", "**", "==", "!=", "<=", ">="};
        std::string op;
        for (auto o : kOps2)
          if (starts(p, o)) op = std::string(o);
        if (op.empty()) {
          if (std::string_view("+-*/%~()[]{},.:|=<>").find(c) == std::string_view::npos)
            error_at(p, cat("unexpected character '", c, "'"));
          op = std::string(1, c);
        }
        if (op == "(" || op == "[" || op == "{") brackets.push_back(op[0]);
        if (op == ")" || op == "]" || op == "}") {
          const char want = op == ")" ? '(' : op == "]" ? '[' : '{';
          if (brackets.empty() || brackets.back() != want) error_at(p, cat("unexpected '", op, "'"));
          brackets.pop_back();
        }
        push(Tok::kOp, op, p);
        p += op.size();
      }
    }
  }

  size_t lex_number(size_t p) {
    size_t e = p;
    auto digits = [&]() {
      while (e < src_.size() && (std::isdigit(static_cast<unsigned char>(src_[e])) || src_[e] == '_')) ++e;
    };
    digits();
    bool is_float = false;
    if (e + 1 < src_.size() && src_[e] == '.' && std::isdigit(static_cast<unsigned char>(src_[e + 1]))) {
      is_float = true;
      ++e;
      digits();
    }
    if (e < src_.size() && (src_[e] == 'e' || src_[e] == 'E')) {
      size_t x = e + 1;
      if (x < src_.size() && (src_[x] == '+' || src_[x] == '-')) ++x;
      if (x < src_.size() && std::isdigit(static_cast<unsigned char>(src_[x]))) {
        is_float = true;
        e = x;
        digits();
      }
    }
    std::string text;
    for (size_t k = p; k < e; ++k)
      if (src_[k] != '_') text += src_[k];
    push(is_float ? Tok::kFloat : Tok::kInt, text, p);
    Token& t = toks_.back();
    if (is_float) {
      t.fval = std::strtod(text.c_str(), nullptr);
    } else {
      auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), t.ival);
      if (ec != std::errc() || ptr != text.data() + text.size())
        error_at(p, cat("integer literal ", text, " out of range"));
    }
    return e;
  }

  // Python string-literal escapes; unknown escapes keep their backslash, as Python does.
  size_t lex_string(size_t p) {
    const char q = src_[p];
    std::string out;
    size_t k = p + 1;
    auto hex = [&](size_t start, int n) -> char32_t {
      if (start + static_cast<size_t>(n) > src_.size()) error_at(k, "truncated escape in string literal");
      char32_t v = 0;
      for (int d = 0; d < n; ++d) {
        const char h = src_[start + static_cast<size_t>(d)];
        if (!std::isxdigit(static_cast<unsigned char>(h))) error_at(k, "bad hex digit in string escape");
        v = v * 16 + static_cast<char32_t>(std::isdigit(static_cast<unsigned char>(h)) ? h - '0' : (std::tolower(h) - 'a' + 10));
      }
      return v;
    };
    while (true) {
      if (k >= src_.size()) error_at(p, "unterminated string literal");
      const char c = src_[k];
      if (c == q) break;
      if (c != '\\') {
        out += c;
        ++k;
        continue;
      }
      if (k + 1 >= src_.size()) error_at(p, "unterminated string literal");
      const char e = src_[k + 1];
      k += 2;
      switch (e) {
        case 'n': out += '\n'; break;
        case 't': out += '\t'; break;
        case 'r': out += '\r'; break;
        case '\\': out += '\\'; break;
        case '\'': out += '\''; break;
        case '"': out += '"'; break;
        case 'a': out += '\a'; break;
        case 'b': out += '\b'; break;
        case 'f': out += '\f'; break;
        case 'v': out += '\v'; break;
        case '\n': break;
        case 'x': append_utf8(out, hex(k, 2)); k += 2; break;
        case 'u': append_utf8(out, hex(k, 4)); k += 4; break;
        case 'U': {
          const char32_t v = hex(k, 8);
          if (v > 0x10FFFF) error_at(k, "escape \\U out of range");
          append_utf8(out, v);
          k += 8;
          break;
        }
        default:
          if (e >= '0' && e <= '7') {
            char32_t v = static_cast<char32_t>(e - '0');
            for (int d = 0; d < 2 && k < src_.size() && src_[k] >= '0' && src_[k] <= '7'; ++d, ++k)
              v = v * 8 + static_cast<char32_t>(src_[k] - '0');
            append_utf8(out, v);
          } else {
            out += '\\';
            out += e;
          }
      }
    }
    push(Tok::kString, out, p);
    return k + 1;
  }

  std::string src_;
  size_t pos_ = 0;
  std::vector<Token> toks_;
  size_t lc_pos_ = 0;
  int lc_line_ = 1;
  int lc_col_ = 1;
};

// ------------------------------------------------------------------------------------------------
// Tree

struct Expr;
using ExprP = std::unique_ptr<Expr>;
struct Expr {
  enum class K { kLiteral, kName, kAttr, kItem, kSlice, kCall, kFilter, kTest, kNeg, kPos, kNot, kBin, kAnd, kOr, kCompare, kCond, kList, kTuple, kDict };
  K k;
  int line = 0;
  Value lit;
  std::string name;  // name, attribute, filter/test name, binary operator
  bool negate = false;
  std::vector<ExprP> args;  // operands; null entries for omitted slice bounds / else branches
  std::vector<std::pair<std::string, ExprP>> kwargs;
  std::vector<std::string> ops;  // comparison operators
};

struct Node;
using NodeP = std::unique_ptr<Node>;
using Body = std::vector<NodeP>;
struct Node {
  enum class K { kText, kOutput, kIf, kFor, kSet, kSetBlock, kMacro, kBreak, kContinue, kScope, kFilterBlock };
  K k;
  int line = 0;
  std::string text;
  ExprP expr;  // output / for iterable / set value / filter chain
  ExprP cond;  // for-loop filter
  std::vector<std::string> targets;
  std::string attr;  // set ns.attr
  std::vector<std::pair<ExprP, Body>> branches;
  Body body, else_body;
  std::vector<std::string> params;
  std::vector<ExprP> defaults;  // parallel to params, null where none
};

class Parser {
 public:
  explicit Parser(std::vector<Token> toks) : t_(std::move(toks)) {}

  Body parse_template() {
    Body body = parse_body({});
    return body;
  }

 private:
  const Token& cur() const { return t_[p_]; }
  const Token& peek(size_t n = 1) const { return t_[std::min(p_ + n, t_.size() - 1)]; }
  [[noreturn]] void error(const Token& t, const std::string& msg) const {
    fail("chat template syntax error at line ", t.line, ", column ", t.col, ": ", msg);
  }
  static std::string describe(const Token& t) {
    switch (t.kind) {
      case Tok::kEof: return "end of template";
      case Tok::kVarEnd: return "'}}'";
      case Tok::kBlockEnd: return "'%}'";
      case Tok::kText: return "template text";
      case Tok::kVarBegin: return "'{{'";
      case Tok::kBlockBegin: return "'{%'";
      case Tok::kString: return "string literal";
      default: return "'" + t.text + "'";
    }
  }
  bool is_op(const char* op) const { return cur().kind == Tok::kOp && cur().text == op; }
  bool is_name(const char* n) const { return cur().kind == Tok::kName && cur().text == n; }
  void expect_op(const char* op) {
    if (!is_op(op)) error(cur(), cat("expected '", op, "', got ", describe(cur())));
    ++p_;
  }
  std::string expect_name(const char* what) {
    if (cur().kind != Tok::kName) error(cur(), cat("expected ", what, ", got ", describe(cur())));
    return t_[p_++].text;
  }
  void expect_block_end() {
    if (cur().kind != Tok::kBlockEnd) error(cur(), cat("expected '%}', got ", describe(cur())));
    ++p_;
  }

  struct DepthGuard {
    DepthGuard(Parser& ps, const Token& t) : p(ps) {
      if (++p.depth_ > kMaxParseDepth) p.error(t, "template nested too deeply");
    }
    ~DepthGuard() { --p.depth_; }
    DepthGuard(const DepthGuard&) = delete;
    DepthGuard& operator=(const DepthGuard&) = delete;
    Parser& p;
  };

  ExprP make(Expr::K k, int line) {
    auto e = std::make_unique<Expr>();
    e->k = k;
    e->line = line;
    return e;
  }
  NodeP make_node(Node::K k, int line) {
    auto n = std::make_unique<Node>();
    n->k = k;
    n->line = line;
    return n;
  }

  // Parses nodes until a block tag whose name is in `ends`; leaves the position on that tag's name.
  Body parse_body(const std::vector<std::string>& ends) {
    Body body;
    while (true) {
      const Token& t = cur();
      if (t.kind == Tok::kEof) {
        if (!ends.empty()) error(t, cat("unexpected end of template, expected '{% ", ends.back(), " %}' to close '{% ", open_tag_, " %}' opened at line ", open_line_));
        return body;
      }
      if (t.kind == Tok::kText) {
        auto n = make_node(Node::K::kText, t.line);
        n->text = t.text;
        body.push_back(std::move(n));
        ++p_;
      } else if (t.kind == Tok::kVarBegin) {
        ++p_;
        auto n = make_node(Node::K::kOutput, t.line);
        n->expr = parse_tuple(true);
        if (cur().kind != Tok::kVarEnd) error(cur(), cat("expected '}}', got ", describe(cur())));
        ++p_;
        body.push_back(std::move(n));
      } else if (t.kind == Tok::kBlockBegin) {
        const Token& name = peek();
        if (name.kind == Tok::kName && std::find(ends.begin(), ends.end(), name.text) != ends.end()) {
          ++p_;
          return body;
        }
        ++p_;
        body.push_back(parse_statement());
      } else {
        error(t, cat("unexpected ", describe(t)));
      }
    }
  }

  NodeP parse_statement() {
    const Token& t = cur();
    DepthGuard g(*this, t);
    if (t.kind != Tok::kName) error(t, cat("expected a tag name, got ", describe(t)));
    const std::string tag = t.text;
    ++p_;
    if (tag == "if") return parse_if(t.line);
    if (tag == "for") return parse_for(t.line);
    if (tag == "set") return parse_set(t.line);
    if (tag == "macro") return parse_macro(t.line);
    if (tag == "break" || tag == "continue") {
      if (loop_depth_ == 0) error(t, cat("'", tag, "' outside of a loop"));
      expect_block_end();
      return make_node(tag == "break" ? Node::K::kBreak : Node::K::kContinue, t.line);
    }
    if (tag == "generation" || tag == "with") {
      // transformers' {% generation %} only marks assistant spans; {% with %} opens a scope.
      auto n = make_node(Node::K::kScope, t.line);
      if (tag == "with") {
        while (cur().kind != Tok::kBlockEnd) {
          auto s = make_node(Node::K::kSet, cur().line);
          s->targets.push_back(expect_name("a variable name"));
          expect_op("=");
          s->expr = parse_expression(true);
          n->body.push_back(std::move(s));
          if (!is_op(",")) break;
          ++p_;
        }
      }
      expect_block_end();
      Body inner = enter(tag, t.line, [&] { return parse_body({"end" + tag}); });
      ++p_;
      expect_block_end();
      for (auto& x : inner) n->body.push_back(std::move(x));
      return n;
    }
    if (tag == "filter") {
      auto n = make_node(Node::K::kFilterBlock, t.line);
      n->expr = parse_filter_chain(nullptr);
      expect_block_end();
      n->body = enter(tag, t.line, [&] { return parse_body({"endfilter"}); });
      ++p_;
      expect_block_end();
      return n;
    }
    if (tag.rfind("end", 0) == 0 || tag == "else" || tag == "elif") {
      if (open_tag_.empty()) error(t, cat("unexpected '", tag, "' with no open block"));
      error(t, cat("unexpected '", tag, "' inside '", open_tag_, "' opened at line ", open_line_));
    }
    error(t, cat("unknown tag '", tag, "'"));
  }

  template <typename F>
  Body enter(const std::string& tag, int line, F&& f) {
    const std::string saved_tag = open_tag_;
    const int saved_line = open_line_;
    open_tag_ = tag;
    open_line_ = line;
    Body b = f();
    open_tag_ = saved_tag;
    open_line_ = saved_line;
    return b;
  }

  NodeP parse_if(int line) {
    auto n = make_node(Node::K::kIf, line);
    ExprP cond = parse_tuple(true);
    expect_block_end();
    while (true) {
      Body b = enter("if", line, [&] { return parse_body({"elif", "else", "endif"}); });
      n->branches.emplace_back(std::move(cond), std::move(b));
      const std::string tag = cur().text;
      ++p_;
      if (tag == "elif") {
        cond = parse_tuple(true);
        expect_block_end();
        continue;
      }
      if (tag == "else") {
        expect_block_end();
        n->else_body = enter("if", line, [&] { return parse_body({"endif"}); });
        ++p_;
      }
      expect_block_end();
      return n;
    }
  }

  NodeP parse_for(int line) {
    auto n = make_node(Node::K::kFor, line);
    const bool paren = is_op("(");
    if (paren) ++p_;
    n->targets.push_back(expect_name("a loop variable"));
    while (is_op(",")) {
      ++p_;
      if (cur().kind != Tok::kName) break;
      n->targets.push_back(expect_name("a loop variable"));
    }
    if (paren) expect_op(")");
    if (!is_name("in")) error(cur(), cat("expected 'in', got ", describe(cur())));
    ++p_;
    n->expr = parse_tuple(false);
    if (is_name("if")) {
      ++p_;
      n->cond = parse_expression(true);
    }
    if (is_name("recursive")) error(cur(), "recursive loops are not supported");
    expect_block_end();
    ++loop_depth_;
    n->body = enter("for", line, [&] { return parse_body({"else", "endfor"}); });
    --loop_depth_;
    if (cur().text == "else") {
      ++p_;
      expect_block_end();
      n->else_body = enter("for", line, [&] { return parse_body({"endfor"}); });
    }
    ++p_;
    expect_block_end();
    return n;
  }

  NodeP parse_set(int line) {
    std::vector<std::string> targets{expect_name("a variable name")};
    std::string attr;
    if (is_op(".")) {
      ++p_;
      attr = expect_name("an attribute name");
    } else {
      while (is_op(",")) {
        ++p_;
        targets.push_back(expect_name("a variable name"));
      }
    }
    if (is_op("=")) {
      ++p_;
      auto n = make_node(Node::K::kSet, line);
      n->targets = std::move(targets);
      n->attr = std::move(attr);
      n->expr = parse_tuple(true);
      expect_block_end();
      return n;
    }
    auto n = make_node(Node::K::kSetBlock, line);
    if (targets.size() != 1) error(cur(), "a block set assigns exactly one name");
    n->targets = std::move(targets);
    n->attr = std::move(attr);
    if (is_op("|")) n->expr = parse_filter_chain(nullptr);
    expect_block_end();
    n->body = enter("set", line, [&] { return parse_body({"endset"}); });
    ++p_;
    expect_block_end();
    return n;
  }

  NodeP parse_macro(int line) {
    auto n = make_node(Node::K::kMacro, line);
    n->text = expect_name("a macro name");
    expect_op("(");
    while (!is_op(")")) {
      n->params.push_back(expect_name("a parameter name"));
      if (is_op("=")) {
        ++p_;
        n->defaults.push_back(parse_expression(true));
      } else {
        if (!n->defaults.empty() && n->defaults.back()) error(cur(), "non-default argument follows default argument");
        n->defaults.push_back(nullptr);
      }
      if (!is_op(",")) break;
      ++p_;
    }
    expect_op(")");
    expect_block_end();
    const int saved = loop_depth_;
    loop_depth_ = 0;
    n->body = enter("macro", line, [&] { return parse_body({"endmacro"}); });
    loop_depth_ = saved;
    ++p_;
    expect_block_end();
    return n;
  }

  // ---- expressions (Jinja2's precedence, lowest first)

  ExprP parse_tuple(bool with_cond) {
    const int line = cur().line;
    ExprP first = parse_expression(with_cond);
    if (!is_op(",")) return first;
    auto t = make(Expr::K::kTuple, line);
    t->args.push_back(std::move(first));
    while (is_op(",")) {
      ++p_;
      if (cur().kind == Tok::kVarEnd || cur().kind == Tok::kBlockEnd || is_op(")") || is_name("if")) break;
      t->args.push_back(parse_expression(with_cond));
    }
    return t;
  }

  ExprP parse_expression(bool with_cond) {
    DepthGuard g(*this, cur());
    ExprP e = parse_or();
    if (!with_cond) return e;
    while (is_name("if")) {
      const int line = cur().line;
      ++p_;
      auto c = make(Expr::K::kCond, line);
      ExprP test = parse_or();
      ExprP other;
      if (is_name("else")) {
        ++p_;
        other = parse_expression(true);
      }
      c->args.push_back(std::move(test));
      c->args.push_back(std::move(e));
      c->args.push_back(std::move(other));
      e = std::move(c);
    }
    return e;
  }

  ExprP parse_or() {
    ExprP e = parse_and();
    while (is_name("or")) {
      auto n = make(Expr::K::kOr, cur().line);
      ++p_;
      n->args.push_back(std::move(e));
      n->args.push_back(parse_and());
      e = std::move(n);
    }
    return e;
  }
  ExprP parse_and() {
    ExprP e = parse_not();
    while (is_name("and")) {
      auto n = make(Expr::K::kAnd, cur().line);
      ++p_;
      n->args.push_back(std::move(e));
      n->args.push_back(parse_not());
      e = std::move(n);
    }
    return e;
  }
  ExprP parse_not() {
    if (is_name("not")) {
      DepthGuard g(*this, cur());
      auto n = make(Expr::K::kNot, cur().line);
      ++p_;
      n->args.push_back(parse_not());
      return n;
    }
    return parse_compare();
  }
  ExprP parse_compare() {
    const int line = cur().line;
    ExprP e = parse_math1();
    ExprP cmp;
    while (true) {
      std::string op;
      if (cur().kind == Tok::kOp && (cur().text == "==" || cur().text == "!=" || cur().text == "<" ||
                                     cur().text == "<=" || cur().text == ">" || cur().text == ">=")) {
        op = cur().text;
        ++p_;
      } else if (is_name("in")) {
        op = "in";
        ++p_;
      } else if (is_name("not") && peek().kind == Tok::kName && peek().text == "in") {
        op = "not in";
        p_ += 2;
      } else {
        break;
      }
      if (!cmp) {
        cmp = make(Expr::K::kCompare, line);
        cmp->args.push_back(std::move(e));
      }
      cmp->ops.push_back(op);
      cmp->args.push_back(parse_math1());
    }
    return cmp ? std::move(cmp) : std::move(e);
  }
  ExprP binary(ExprP a, const std::string& op, ExprP b, int line) {
    auto n = make(Expr::K::kBin, line);
    n->name = op;
    n->args.push_back(std::move(a));
    n->args.push_back(std::move(b));
    return n;
  }
  ExprP parse_math1() {
    ExprP e = parse_concat();
    while (is_op("+") || is_op("-")) {
      const Token& t = t_[p_++];
      e = binary(std::move(e), t.text, parse_concat(), t.line);
    }
    return e;
  }
  ExprP parse_concat() {
    ExprP e = parse_math2();
    while (is_op("~")) {
      const Token& t = t_[p_++];
      e = binary(std::move(e), "~", parse_math2(), t.line);
    }
    return e;
  }
  ExprP parse_math2() {
    ExprP e = parse_pow();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      const Token& t = t_[p_++];
      e = binary(std::move(e), t.text, parse_pow(), t.line);
    }
    return e;
  }
  ExprP parse_pow() {
    ExprP e = parse_unary(true);
    while (is_op("**")) {
      const Token& t = t_[p_++];
      e = binary(std::move(e), "**", parse_unary(true), t.line);
    }
    return e;
  }
  ExprP parse_unary(bool with_filter) {
    DepthGuard g(*this, cur());
    ExprP e;
    if (is_op("-") || is_op("+")) {
      auto n = make(is_op("-") ? Expr::K::kNeg : Expr::K::kPos, cur().line);
      ++p_;
      n->args.push_back(parse_unary(false));
      e = std::move(n);
    } else {
      e = parse_primary();
    }
    e = parse_postfix(std::move(e));
    if (with_filter) e = parse_filter_expr(std::move(e));
    return e;
  }

  ExprP parse_primary() {
    const Token& t = cur();
    DepthGuard g(*this, t);
    if (t.kind == Tok::kName) {
      ++p_;
      if (t.text == "true" || t.text == "True") return literal(Value::boolean(true), t.line);
      if (t.text == "false" || t.text == "False") return literal(Value::boolean(false), t.line);
      if (t.text == "none" || t.text == "None") return literal(Value::none(), t.line);
      auto n = make(Expr::K::kName, t.line);
      n->name = t.text;
      return n;
    }
    if (t.kind == Tok::kString) {
      std::string s;
      while (cur().kind == Tok::kString) s += t_[p_++].text;  // adjacent literals concatenate
      return literal(Value::string(std::move(s)), t.line);
    }
    if (t.kind == Tok::kInt) {
      ++p_;
      return literal(Value::integer(t.ival), t.line);
    }
    if (t.kind == Tok::kFloat) {
      ++p_;
      return literal(Value::number(t.fval), t.line);
    }
    if (is_op("(")) {
      ++p_;
      if (is_op(")")) {
        ++p_;
        return make(Expr::K::kTuple, t.line);
      }
      ExprP first = parse_expression(true);
      if (is_op(",")) {
        auto tup = make(Expr::K::kTuple, t.line);
        tup->args.push_back(std::move(first));
        while (is_op(",")) {
          ++p_;
          if (is_op(")")) break;
          tup->args.push_back(parse_expression(true));
        }
        first = std::move(tup);
      }
      expect_op(")");
      return first;
    }
    if (is_op("[")) {
      ++p_;
      auto l = make(Expr::K::kList, t.line);
      while (!is_op("]")) {
        l->args.push_back(parse_expression(true));
        if (!is_op(",")) break;
        ++p_;
      }
      expect_op("]");
      return l;
    }
    if (is_op("{")) {
      ++p_;
      auto d = make(Expr::K::kDict, t.line);
      while (!is_op("}")) {
        d->args.push_back(parse_expression(true));
        expect_op(":");
        d->args.push_back(parse_expression(true));
        if (!is_op(",")) break;
        ++p_;
      }
      expect_op("}");
      return d;
    }
    error(t, cat("unexpected ", describe(t), " in expression"));
  }
  ExprP literal(Value v, int line) {
    auto e = make(Expr::K::kLiteral, line);
    e->lit = std::move(v);
    return e;
  }

  ExprP parse_postfix(ExprP e) {
    while (true) {
      if (is_op(".")) {
        const int line = cur().line;
        ++p_;
        auto a = make(Expr::K::kAttr, line);
        if (cur().kind == Tok::kInt) {
          auto idx = make(Expr::K::kItem, line);
          idx->args.push_back(std::move(e));
          idx->args.push_back(literal(Value::integer(cur().ival), line));
          ++p_;
          e = std::move(idx);
          continue;
        }
        a->name = expect_name("an attribute name");
        a->args.push_back(std::move(e));
        e = std::move(a);
      } else if (is_op("[")) {
        e = parse_subscript(std::move(e));
      } else if (is_op("(")) {
        e = parse_call(std::move(e));
      } else {
        return e;
      }
    }
  }

  ExprP parse_subscript(ExprP e) {
    const int line = cur().line;
    ++p_;
    ExprP parts[3];
    int n = 0;
    bool slice = false;
    while (true) {
      if (!is_op(":") && !is_op("]")) parts[n] = parse_expression(true);
      if (is_op(":")) {
        slice = true;
        if (++n > 2) error(cur(), "too many ':' in slice");
        ++p_;
        continue;
      }
      break;
    }
    expect_op("]");
    if (!slice) {
      if (!parts[0]) error(cur(), "empty subscript");
      auto it = make(Expr::K::kItem, line);
      it->args.push_back(std::move(e));
      it->args.push_back(std::move(parts[0]));
      return it;
    }
    auto s = make(Expr::K::kSlice, line);
    s->args.push_back(std::move(e));
    for (auto& x : parts) s->args.push_back(std::move(x));
    return s;
  }

  void parse_args(Expr& call) {
    expect_op("(");
    while (!is_op(")")) {
      if (cur().kind == Tok::kName && peek().kind == Tok::kOp && peek().text == "=") {
        std::string key = t_[p_].text;
        p_ += 2;
        call.kwargs.emplace_back(std::move(key), parse_expression(true));
      } else {
        if (!call.kwargs.empty()) error(cur(), "positional argument follows keyword argument");
        call.args.push_back(parse_expression(true));
      }
      if (!is_op(",")) break;
      ++p_;
    }
    expect_op(")");
  }

  ExprP parse_call(ExprP callee) {
    auto c = make(Expr::K::kCall, cur().line);
    c->args.push_back(std::move(callee));
    parse_args(*c);
    return c;
  }

  // `x | f(a) | g` and `x is test`, interleaved with calls, as in Jinja2's parse_filter_expr.
  ExprP parse_filter_expr(ExprP e) {
    while (true) {
      if (is_op("|")) {
        e = parse_filter_chain(std::move(e), true);
      } else if (is_name("is")) {
        e = parse_test(std::move(e));
      } else if (is_op("(")) {
        e = parse_call(std::move(e));
      } else {
        return e;
      }
    }
  }

  ExprP parse_filter_chain(ExprP subject, bool single = false) {
    do {
      const int line = cur().line;
      if (is_op("|")) ++p_;
      auto f = make(Expr::K::kFilter, line);
      f->name = expect_name("a filter name");
      while (is_op(".")) {
        ++p_;
        f->name += '.';
        f->name += expect_name("a filter name");
      }
      f->args.push_back(std::move(subject));
      if (is_op("(")) parse_args(*f);
      subject = std::move(f);
    } while (!single && is_op("|"));
    return subject;
  }

  ExprP parse_test(ExprP subject) {
    auto t = make(Expr::K::kTest, cur().line);
    ++p_;
    if (is_name("not")) {
      t->negate = true;
      ++p_;
    }
    t->name = expect_name("a test name");
    t->args.push_back(std::move(subject));
    if (is_op("(")) {
      parse_args(*t);
    } else if ((cur().kind == Tok::kName || cur().kind == Tok::kString || cur().kind == Tok::kInt ||
                cur().kind == Tok::kFloat || is_op("(") || is_op("[") || is_op("{")) &&
               !is_name("else") && !is_name("or") && !is_name("and")) {
      if (is_name("is")) error(cur(), "you cannot chain multiple tests with 'is'");
      t->args.push_back(parse_postfix(parse_primary()));
    }
    return t;
  }

  std::vector<Token> t_;
  size_t p_ = 0;
  int depth_ = 0;
  int loop_depth_ = 0;
  std::string open_tag_;
  int open_line_ = 0;
};

}  // namespace

struct ChatTemplate::Impl {
  Body body;
};

namespace {

// ------------------------------------------------------------------------------------------------
// Renderer

struct Scope;
using ScopeP = std::shared_ptr<Scope>;
struct Scope {
  ScopeP parent;
  std::unordered_map<std::string, Value> vars;
  const Value* find(const std::string& name) const {
    for (const Scope* s = this; s; s = s->parent.get()) {
      auto it = s->vars.find(name);
      if (it != s->vars.end()) return &it->second;
    }
    return nullptr;
  }
};

enum class Flow { kNormal, kBreak, kContinue };

// The raise_exception message must reach the caller verbatim, so it travels as its own type until
// render() turns it into shardlm::Error.
struct TemplateRaise {
  std::string message;
};

class Renderer {
 public:
  // Counts nesting on entry and uncounts on exit, so that macro recursion and deeply nested
  // expressions end in an Error long before the native stack runs out.
  struct NestGuard {
    NestGuard(int& counter, int limit, const Renderer& r, int line, const char* what) : c(counter) {
      if (++c > limit) {
        --c;
        r.error(line, cat(what, " nested deeper than ", limit));
      }
    }
    ~NestGuard() { --c; }
    NestGuard(const NestGuard&) = delete;
    NestGuard& operator=(const NestGuard&) = delete;
    int& c;
  };

  [[noreturn]] void error(int line, const std::string& msg) const {
    fail("chat template error at line ", line, ": ", msg);
  }

  void emit(std::string& out, std::string_view s, int line) const {
    if (out.size() + s.size() > kMaxOutputBytes)
      error(line, cat("output exceeds ", kMaxOutputBytes, " bytes"));
    out.append(s);
  }

  Flow exec(const Body& body, const ScopeP& scope, std::string& out) {
    for (const auto& n : body) {
      const Flow f = exec_node(*n, scope, out);
      if (f != Flow::kNormal) return f;
    }
    return Flow::kNormal;
  }

  Flow exec_node(const Node& n, const ScopeP& scope, std::string& out) {
    NestGuard guard(eval_depth_, kMaxEvalDepth, *this, n.line, "block evaluation");
    switch (n.k) {
      case Node::K::kText: emit(out, n.text, n.line); return Flow::kNormal;
      case Node::K::kOutput: emit(out, to_str(eval(*n.expr, scope)), n.line); return Flow::kNormal;
      case Node::K::kIf:
        for (const auto& [cond, body] : n.branches)
          if (truthy(eval(*cond, scope))) return exec(body, scope, out);
        return exec(n.else_body, scope, out);
      case Node::K::kFor: return exec_for(n, scope, out);
      case Node::K::kSet: assign(n, eval(*n.expr, scope), scope); return Flow::kNormal;
      case Node::K::kSetBlock: {
        std::string buf;
        auto inner = std::make_shared<Scope>();
        inner->parent = scope;
        exec(n.body, inner, buf);
        Value v = Value::string(std::move(buf));
        if (n.expr) v = apply_filter_chain(*n.expr, std::move(v), scope);
        assign(n, std::move(v), scope);
        return Flow::kNormal;
      }
      case Node::K::kFilterBlock: {
        std::string buf;
        auto inner = std::make_shared<Scope>();
        inner->parent = scope;
        exec(n.body, inner, buf);
        emit(out, to_str(apply_filter_chain(*n.expr, Value::string(std::move(buf)), scope)), n.line);
        return Flow::kNormal;
      }
      case Node::K::kMacro: scope->vars[n.text] = make_macro(n, scope); return Flow::kNormal;
      case Node::K::kBreak: return Flow::kBreak;
      case Node::K::kContinue: return Flow::kContinue;
      case Node::K::kScope: {
        auto inner = std::make_shared<Scope>();
        inner->parent = scope;
        return exec(n.body, inner, out);
      }
    }
    return Flow::kNormal;
  }

  void assign(const Node& n, Value v, const ScopeP& scope) {
    if (!n.attr.empty()) {
      const Value* ns = scope->find(n.targets[0]);
      if (!ns || ns->kind != Value::Kind::kDict || !ns->is_namespace)
        error(n.line, cat("cannot assign attribute on non-namespace object '", n.targets[0], "'"));
      ns->dict->set(Value::string(n.attr), std::move(v));
      return;
    }
    if (n.targets.size() == 1) {
      scope->vars[n.targets[0]] = std::move(v);
      return;
    }
    ValueList items = iterate(v, n.line);
    if (items.size() != n.targets.size())
      error(n.line, cat("cannot unpack ", items.size(), " values into ", n.targets.size(), " names"));
    for (size_t k = 0; k < items.size(); ++k) scope->vars[n.targets[k]] = items[k];
  }

  void bind_targets(const std::vector<std::string>& targets, const Value& item, Scope& s, int line) {
    if (targets.size() == 1) {
      s.vars[targets[0]] = item;
      return;
    }
    ValueList parts = iterate(item, line);
    if (parts.size() != targets.size())
      error(line, cat("cannot unpack ", parts.size(), " values into ", targets.size(), " loop variables"));
    for (size_t k = 0; k < parts.size(); ++k) s.vars[targets[k]] = parts[k];
  }

  Flow exec_for(const Node& n, const ScopeP& scope, std::string& out) {
    // Lists are iterated in place (no copy): a range() of 100k items inside another loop is common
    // in hostile templates and would otherwise dominate.
    const Value seq = eval(*n.expr, scope);
    std::shared_ptr<const ValueList> items =
        seq.kind == Value::Kind::kList ? seq.list : std::make_shared<const ValueList>(iterate(seq, n.line));
    if (n.cond) {
      ValueList kept;
      auto s = std::make_shared<Scope>();
      s->parent = scope;
      for (const auto& it : *items) {
        count_iteration(n.line);
        s->vars.clear();
        bind_targets(n.targets, it, *s, n.line);
        if (truthy(eval(*n.cond, s))) kept.push_back(it);
      }
      items = std::make_shared<const ValueList>(std::move(kept));
    }
    const auto len = static_cast<int64_t>(items->size());
    if (len == 0) return exec(n.else_body, scope, out);
    // One loop object per loop, updated in place: Jinja2's LoopContext is likewise a single object
    // whose attributes advance with the iteration.
    auto loop = std::make_shared<DictData>();
    auto cycle_index = std::make_shared<int64_t>(0);
    auto cyc = std::make_shared<Callable>();
    cyc->name = "cycle";
    cyc->call = [cycle_index](Renderer& r, CallArgs& a) -> Value {
      if (a.pos.empty()) r.error(a.line, "loop.cycle() needs at least one argument");
      return a.pos[static_cast<size_t>(*cycle_index) % a.pos.size()];
    };
    for (const char* k : {"index", "index0", "revindex", "revindex0", "first", "last", "length", "depth",
                          "depth0", "previtem", "nextitem"})
      loop->items.emplace_back(Value::string(k), Value());
    loop->items.emplace_back(Value::string("cycle"), Value::callable(std::move(cyc)));
    const Value loop_value = Value::make_dict(loop);
    auto s = std::make_shared<Scope>();
    s->parent = scope;
    for (int64_t idx = 0; idx < len; ++idx) {
      count_iteration(n.line);
      // A fresh set of locals per iteration: Jinja2 does not carry a `set` over to the next one.
      if (s->vars.size() > n.targets.size() + 1) s->vars.clear();  // the body set something
      bind_targets(n.targets, (*items)[static_cast<size_t>(idx)], *s, n.line);
      *cycle_index = idx;
      auto& f = loop->items;
      f[0].second = Value::integer(idx + 1);
      f[1].second = Value::integer(idx);
      f[2].second = Value::integer(len - idx);
      f[3].second = Value::integer(len - idx - 1);
      f[4].second = Value::boolean(idx == 0);
      f[5].second = Value::boolean(idx == len - 1);
      f[6].second = Value::integer(len);
      f[7].second = Value::integer(1);
      f[8].second = Value::integer(0);
      f[9].second = idx > 0 ? (*items)[static_cast<size_t>(idx - 1)] : Value::undefined("previtem");
      f[10].second = idx + 1 < len ? (*items)[static_cast<size_t>(idx + 1)] : Value::undefined("nextitem");
      s->vars["loop"] = loop_value;
      if (exec(n.body, s, out) == Flow::kBreak) break;
    }
    return Flow::kNormal;
  }

  void count_iteration(int line) {
    if (++iterations_ > kMaxLoopIterations) error(line, cat("more than ", kMaxLoopIterations, " loop iterations"));
  }

  Value make_macro(const Node& n, const ScopeP& defining) {
    auto c = std::make_shared<Callable>();
    c->name = n.text;
    const Node* node = &n;
    // The macro keeps its defining scope alive through a weak reference: a strong one would make a
    // cycle (scope -> macro -> scope) that never frees.
    std::weak_ptr<Scope> weak = defining;
    c->call = [node, weak](Renderer& r, CallArgs& a) -> Value {
      ScopeP parent = weak.lock();
      if (!parent) r.error(a.line, cat("macro '", node->text, "' called after its scope ended"));
      if (a.pos.size() > node->params.size())
        r.error(a.line, cat("macro '", node->text, "' takes not more than ", node->params.size(), " argument(s)"));
      auto s = std::make_shared<Scope>();
      s->parent = parent;
      for (size_t k = 0; k < node->params.size(); ++k) {
        if (k < a.pos.size()) {
          s->vars[node->params[k]] = a.pos[k];
          continue;
        }
        const Value* kw = nullptr;
        for (const auto& [name, v] : a.kw)
          if (name == node->params[k]) kw = &v;
        if (kw) {
          s->vars[node->params[k]] = *kw;
        } else if (node->defaults[k]) {
          s->vars[node->params[k]] = r.eval(*node->defaults[k], s);
        } else {
          s->vars[node->params[k]] = Value::undefined(node->params[k]);
        }
      }
      for (const auto& [name, v] : a.kw)
        if (std::find(node->params.begin(), node->params.end(), name) == node->params.end())
          r.error(a.line, cat("macro '", node->text, "' got an unexpected keyword argument '", name, "'"));
      NestGuard guard(r.call_depth_, kMaxCallDepth, r, a.line, "macro calls");
      std::string buf;
      r.exec(node->body, s, buf);
      return Value::string(std::move(buf));
    };
    return Value::callable(std::move(c));
  }

  // ---- expressions

  [[noreturn]] void undefined_error(const Value& v, int line) const {
    error(line, v.s.empty() ? std::string("value is undefined") : cat("'", v.s, "' is undefined"));
  }

  ValueList iterate(const Value& v, int line) const {
    switch (v.kind) {
      case Value::Kind::kUndefined: return {};
      case Value::Kind::kList: return *v.list;
      case Value::Kind::kDict: {
        ValueList keys;
        for (const auto& kv : v.dict->items) keys.push_back(kv.first);
        return keys;
      }
      case Value::Kind::kString: {
        ValueList chars;
        for (char32_t c : decode_utf8(v.s)) {
          std::string one;
          append_utf8(one, c);
          chars.push_back(Value::string(std::move(one)));
        }
        return chars;
      }
      default: error(line, cat("'", type_name(v), "' object is not iterable"));
    }
  }

  Value eval(const Expr& e, const ScopeP& scope) {
    NestGuard guard(eval_depth_, kMaxEvalDepth, *this, e.line, "expression evaluation");
    switch (e.k) {
      case Expr::K::kLiteral: return e.lit;
      case Expr::K::kName: {
        if (const Value* v = scope->find(e.name)) return *v;
        return builtin_global(e.name);
      }
      case Expr::K::kAttr: return get_attr(eval(*e.args[0], scope), e.name, e.line);
      case Expr::K::kItem: return get_item(eval(*e.args[0], scope), eval(*e.args[1], scope), e.line);
      case Expr::K::kSlice: {
        Value obj = eval(*e.args[0], scope);
        std::optional<int64_t> b[3];
        for (int k = 0; k < 3; ++k) {
          if (!e.args[static_cast<size_t>(k) + 1]) continue;
          Value x = eval(*e.args[static_cast<size_t>(k) + 1], scope);
          if (x.kind == Value::Kind::kNone) continue;
          if (x.kind != Value::Kind::kInt && x.kind != Value::Kind::kBool)
            error(e.line, "slice indices must be integers or None");
          b[k] = x.as_int();
        }
        return slice(obj, b[0], b[1], b[2], e.line);
      }
      case Expr::K::kCall: {
        Value callee = eval(*e.args[0], scope);
        CallArgs a = eval_args(e, scope, 1);
        if (callee.is_undefined()) undefined_error(callee, e.line);
        if (callee.kind != Value::Kind::kCallable) error(e.line, cat("'", type_name(callee), "' object is not callable"));
        return callee.fn->call(*this, a);
      }
      case Expr::K::kFilter: {
        Value subject = eval(*e.args[0], scope);
        return apply_filter(e, std::move(subject), scope);
      }
      case Expr::K::kTest: {
        Value subject = eval(*e.args[0], scope);
        CallArgs a = eval_args(e, scope, 1);
        const bool r = apply_test(e.name, subject, a);
        return Value::boolean(e.negate ? !r : r);
      }
      case Expr::K::kNeg:
      case Expr::K::kPos: {
        Value v = eval(*e.args[0], scope);
        if (!v.is_number()) error(e.line, cat("bad operand type for unary ", e.k == Expr::K::kNeg ? "-" : "+", ": '", type_name(v), "'"));
        if (e.k == Expr::K::kPos) return v.kind == Value::Kind::kBool ? Value::integer(v.as_int()) : v;
        if (v.kind == Value::Kind::kFloat) return Value::number(-v.f);
        if (v.as_int() == INT64_MIN) error(e.line, "integer overflow");
        return Value::integer(-v.as_int());
      }
      case Expr::K::kNot: return Value::boolean(!truthy(eval(*e.args[0], scope)));
      case Expr::K::kAnd: {
        Value a = eval(*e.args[0], scope);
        return truthy(a) ? eval(*e.args[1], scope) : a;
      }
      case Expr::K::kOr: {
        Value a = eval(*e.args[0], scope);
        return truthy(a) ? a : eval(*e.args[1], scope);
      }
      case Expr::K::kBin: return binop(e.name, eval(*e.args[0], scope), eval(*e.args[1], scope), e.line);
      case Expr::K::kCompare: {
        Value left = eval(*e.args[0], scope);
        for (size_t k = 0; k < e.ops.size(); ++k) {
          Value right = eval(*e.args[k + 1], scope);
          if (!compare(e.ops[k], left, right, e.line)) return Value::boolean(false);
          left = std::move(right);
        }
        return Value::boolean(true);
      }
      case Expr::K::kCond:
        if (truthy(eval(*e.args[0], scope))) return eval(*e.args[1], scope);
        return e.args[2] ? eval(*e.args[2], scope) : Value::undefined();
      case Expr::K::kList:
      case Expr::K::kTuple: {
        ValueList items;
        for (const auto& x : e.args) items.push_back(eval(*x, scope));
        return Value::make_list(std::move(items), e.k == Expr::K::kTuple);
      }
      case Expr::K::kDict: {
        auto d = std::make_shared<DictData>();
        for (size_t k = 0; k + 1 < e.args.size(); k += 2) {
          Value key = eval(*e.args[k], scope);
          d->set(std::move(key), eval(*e.args[k + 1], scope));
        }
        return Value::make_dict(std::move(d));
      }
    }
    return Value::undefined();
  }

  CallArgs eval_args(const Expr& e, const ScopeP& scope, size_t first) {
    CallArgs a;
    a.line = e.line;
    for (size_t k = first; k < e.args.size(); ++k) a.pos.push_back(eval(*e.args[k], scope));
    for (const auto& [name, x] : e.kwargs) a.kw.emplace_back(name, eval(*x, scope));
    return a;
  }

  Value apply_filter_chain(const Expr& chain, Value v, const ScopeP& scope) {
    // The chain's innermost filter has a null subject: that is where `v` goes.
    if (!chain.args[0]) return apply_filter(chain, std::move(v), scope);
    Value inner = apply_filter_chain(*chain.args[0], std::move(v), scope);
    return apply_filter(chain, std::move(inner), scope);
  }

  Value builtin_global(const std::string& name) {
    auto make = [&](std::function<Value(Renderer&, CallArgs&)> f) {
      auto c = std::make_shared<Callable>();
      c->name = name;
      c->call = std::move(f);
      return Value::callable(std::move(c));
    };
    if (name == "raise_exception")
      return make([](Renderer&, CallArgs& a) -> Value {
        throw TemplateRaise{a.pos.empty() ? std::string() : to_str(a.pos[0])};
      });
    if (name == "namespace" || name == "dict")
      return make([ns = name == "namespace"](Renderer& r, CallArgs& a) -> Value {
        auto d = std::make_shared<DictData>();
        for (const auto& p : a.pos) {
          if (p.kind != Value::Kind::kDict) r.error(a.line, "namespace()/dict() positional argument must be a mapping");
          for (const auto& kv : p.dict->items) d->set(kv.first, kv.second);
        }
        for (const auto& [k, v] : a.kw) d->set(Value::string(k), v);
        Value v = Value::make_dict(std::move(d));
        v.is_namespace = ns;
        return v;
      });
    if (name == "range")
      return make([](Renderer& r, CallArgs& a) -> Value {
        int64_t b[3] = {0, 0, 1};
        if (a.pos.empty() || a.pos.size() > 3) r.error(a.line, "range() takes 1 to 3 arguments");
        for (const auto& p : a.pos)
          if (p.kind != Value::Kind::kInt && p.kind != Value::Kind::kBool) r.error(a.line, "range() arguments must be integers");
        if (a.pos.size() == 1) {
          b[1] = a.pos[0].as_int();
        } else {
          b[0] = a.pos[0].as_int();
          b[1] = a.pos[1].as_int();
          if (a.pos.size() == 3) b[2] = a.pos[2].as_int();
        }
        if (b[2] == 0) r.error(a.line, "range() arg 3 must not be zero");
        ValueList items;
        for (int64_t x = b[0]; b[2] > 0 ? x < b[1] : x > b[1]; x += b[2]) {
          if (static_cast<int64_t>(items.size()) >= kMaxRange)
            r.error(a.line, cat("range too big; the sandbox blocks ranges larger than ", kMaxRange));
          items.push_back(Value::integer(x));
          if ((b[2] > 0 && x > INT64_MAX - b[2]) || (b[2] < 0 && x < INT64_MIN - b[2])) break;
        }
        return Value::make_list(std::move(items));
      });
    if (name == "strftime_now")
      return make([](Renderer& r, CallArgs& a) -> Value {
        if (a.pos.empty() || !a.pos[0].is_string()) r.error(a.line, "strftime_now() needs a format string");
        const std::time_t now = std::time(nullptr);
        std::tm tm{};
        localtime_r(&now, &tm);
        char buf[256];
        const size_t n = std::strftime(buf, sizeof buf, a.pos[0].s.c_str(), &tm);
        return Value::string(std::string(buf, n));
      });
    return Value::undefined(name);
  }

  // ---- attribute and item access (Jinja2: obj.x tries the attribute then the item; obj[x] the
  // item then the attribute)

  Value get_attr(const Value& obj, const std::string& name, int line) {
    if (obj.is_undefined()) undefined_error(obj, line);
    if (Value m = method(obj, name); m.kind == Value::Kind::kCallable) return m;
    if (obj.kind == Value::Kind::kDict) {
      if (const Value* v = obj.dict->find(std::string_view(name))) return *v;
    }
    return Value::undefined(name);
  }

  Value get_item(const Value& obj, const Value& key, int line) {
    if (obj.is_undefined()) undefined_error(obj, line);
    if (obj.kind == Value::Kind::kDict) {
      if (const Value* v = obj.dict->find(key)) return *v;
    } else if ((obj.kind == Value::Kind::kList || obj.kind == Value::Kind::kString) &&
               (key.kind == Value::Kind::kInt || key.kind == Value::Kind::kBool)) {
      if (obj.kind == Value::Kind::kList) {
        const auto n = static_cast<int64_t>(obj.list->size());
        int64_t k = key.as_int();
        if (k < 0) k += n;
        if (k >= 0 && k < n) return (*obj.list)[static_cast<size_t>(k)];
      } else {
        const std::u32string u = decode_utf8(obj.s);
        const auto n = static_cast<int64_t>(u.size());
        int64_t k = key.as_int();
        if (k < 0) k += n;
        if (k >= 0 && k < n) {
          std::string one;
          append_utf8(one, u[static_cast<size_t>(k)]);
          return Value::string(std::move(one));
        }
      }
      return Value::undefined();
    }
    if (key.is_string()) {
      if (Value m = method(obj, key.s); m.kind == Value::Kind::kCallable) return m;
    }
    return Value::undefined(key.is_string() ? key.s : std::string());
  }

  Value slice(const Value& obj, std::optional<int64_t> start, std::optional<int64_t> stop,
              std::optional<int64_t> step, int line) {
    if (obj.is_undefined()) undefined_error(obj, line);
    const int64_t st = step.value_or(1);
    if (st == 0) error(line, "slice step cannot be zero");
    auto pick = [&](int64_t n, auto&& take) {
      auto norm = [&](std::optional<int64_t> v, int64_t dflt) {
        if (!v) return dflt;
        int64_t x = *v;
        if (x < 0) x += n;
        if (st > 0) return std::clamp<int64_t>(x, 0, n);
        return std::clamp<int64_t>(x, -1, n - 1);
      };
      const int64_t b = norm(start, st > 0 ? 0 : n - 1);
      const int64_t e = norm(stop, st > 0 ? n : -1);
      for (int64_t k = b; st > 0 ? k < e : k > e; k += st) take(static_cast<size_t>(k));
    };
    if (obj.kind == Value::Kind::kList) {
      ValueList out;
      pick(static_cast<int64_t>(obj.list->size()), [&](size_t k) { out.push_back((*obj.list)[k]); });
      return Value::make_list(std::move(out), obj.is_tuple);
    }
    if (obj.kind == Value::Kind::kString) {
      const std::u32string u = decode_utf8(obj.s);
      std::u32string out;
      pick(static_cast<int64_t>(u.size()), [&](size_t k) { out.push_back(u[k]); });
      return Value::string(encode_utf8(out));
    }
    error(line, cat("'", type_name(obj), "' object is not subscriptable"));
  }

  // ---- operators

  Value binop(const std::string& op, const Value& a, const Value& b, int line) {
    if (op == "~") {
      std::string s = to_str(a);
      const std::string t = to_str(b);
      if (s.size() + t.size() > kMaxOutputBytes) error(line, "string too long");
      return Value::string(s + t);
    }
    if (a.is_undefined()) undefined_error(a, line);
    if (b.is_undefined()) undefined_error(b, line);
    auto type_err = [&]() -> Value {
      error(line, cat("unsupported operand type(s) for ", op, ": '", type_name(a), "' and '", type_name(b), "'"));
    };
    if (a.is_number() && b.is_number()) {
      const bool fl = a.kind == Value::Kind::kFloat || b.kind == Value::Kind::kFloat;
      if (op == "/") {
        if (b.as_double() == 0) error(line, "division by zero");
        return Value::number(a.as_double() / b.as_double());
      }
      if (fl) {
        const double x = a.as_double(), y = b.as_double();
        if (op == "+") return Value::number(x + y);
        if (op == "-") return Value::number(x - y);
        if (op == "*") return Value::number(x * y);
        if (op == "**") return Value::number(std::pow(x, y));
        if (y == 0) error(line, "float division by zero");
        if (op == "//") return Value::number(std::floor(x / y));
        if (op == "%") {
          double m = std::fmod(x, y);
          if (m != 0 && ((m < 0) != (y < 0))) m += y;
          return Value::number(m);
        }
        return type_err();
      }
      const int64_t x = a.as_int(), y = b.as_int();
      int64_t r = 0;
      bool ovf = false;
      if (op == "+") {
        ovf = __builtin_add_overflow(x, y, &r);
      } else if (op == "-") {
        ovf = __builtin_sub_overflow(x, y, &r);
      } else if (op == "*") {
        ovf = __builtin_mul_overflow(x, y, &r);
      } else if (op == "**") {
        if (y < 0) return Value::number(std::pow(static_cast<double>(x), static_cast<double>(y)));
        r = 1;
        for (int64_t k = 0; k < y && !ovf; ++k) ovf = __builtin_mul_overflow(r, x, &r);
      } else if (op == "//" || op == "%") {
        if (y == 0) error(line, "integer division or modulo by zero");
        if (x == INT64_MIN && y == -1) {
          ovf = true;
        } else {
          int64_t q = x / y, m = x % y;
          if (m != 0 && ((m < 0) != (y < 0))) {
            --q;
            m += y;
          }
          r = op == "//" ? q : m;
        }
      } else {
        return type_err();
      }
      if (ovf) error(line, cat("integer overflow in ", x, " ", op, " ", y));
      return Value::integer(r);
    }
    if (op == "+") {
      if (a.is_string() && b.is_string()) {
        if (a.s.size() + b.s.size() > kMaxOutputBytes) error(line, "string too long");
        return Value::string(a.s + b.s);
      }
      if (a.kind == Value::Kind::kList && b.kind == Value::Kind::kList) {
        ValueList items = *a.list;
        items.insert(items.end(), b.list->begin(), b.list->end());
        return Value::make_list(std::move(items), a.is_tuple && b.is_tuple);
      }
      if (a.is_string() || b.is_string())
        error(line, cat("can only concatenate str (not \"", type_name(a.is_string() ? b : a), "\") to str"));
      return type_err();
    }
    if (op == "*") {
      const Value& seq = a.is_number() ? b : a;
      const Value& cnt = a.is_number() ? a : b;
      if (cnt.kind != Value::Kind::kInt && cnt.kind != Value::Kind::kBool) return type_err();
      const int64_t n = std::max<int64_t>(0, cnt.as_int());
      if (seq.is_string()) {
        if (n > 0 && seq.s.size() > kMaxOutputBytes / static_cast<size_t>(n)) error(line, "string too long");
        std::string out;
        for (int64_t k = 0; k < n; ++k) out += seq.s;
        return Value::string(std::move(out));
      }
      if (seq.kind == Value::Kind::kList) {
        if (n > 0 && seq.list->size() > static_cast<size_t>(kMaxRange) / static_cast<size_t>(n)) error(line, "list too long");
        ValueList out;
        for (int64_t k = 0; k < n; ++k) out.insert(out.end(), seq.list->begin(), seq.list->end());
        return Value::make_list(std::move(out), seq.is_tuple);
      }
    }
    return type_err();
  }

  bool contains(const Value& container, const Value& item, int line) {
    switch (container.kind) {
      case Value::Kind::kUndefined: return false;
      case Value::Kind::kString:
        if (!item.is_string()) error(line, cat("'in <string>' requires string as left operand, not ", type_name(item)));
        return container.s.find(item.s) != std::string::npos;
      case Value::Kind::kList:
        return std::any_of(container.list->begin(), container.list->end(), [&](const Value& v) { return equals(v, item); });
      case Value::Kind::kDict: return container.dict->find(item) != nullptr;
      default: error(line, cat("argument of type '", type_name(container), "' is not iterable"));
    }
  }

  // Python ordering: numbers with numbers, strings by code point (UTF-8 byte order is the same),
  // sequences lexicographically.
  int order(const Value& a, const Value& b, int line) {
    if (a.is_number() && b.is_number()) {
      const double x = a.as_double(), y = b.as_double();
      if (a.kind != Value::Kind::kFloat && b.kind != Value::Kind::kFloat)
        return a.as_int() < b.as_int() ? -1 : a.as_int() > b.as_int() ? 1 : 0;
      return x < y ? -1 : x > y ? 1 : 0;
    }
    if (a.is_string() && b.is_string()) return a.s < b.s ? -1 : a.s > b.s ? 1 : 0;
    if (a.kind == Value::Kind::kList && b.kind == Value::Kind::kList) {
      const size_t n = std::min(a.list->size(), b.list->size());
      for (size_t k = 0; k < n; ++k) {
        if (equals((*a.list)[k], (*b.list)[k])) continue;
        return order((*a.list)[k], (*b.list)[k], line);
      }
      return a.list->size() < b.list->size() ? -1 : a.list->size() > b.list->size() ? 1 : 0;
    }
    if (a.is_undefined()) undefined_error(a, line);
    if (b.is_undefined()) undefined_error(b, line);
    error(line, cat("'<' not supported between instances of '", type_name(a), "' and '", type_name(b), "'"));
  }

  bool compare(const std::string& op, const Value& a, const Value& b, int line) {
    if (op == "==") return equals(a, b);
    if (op == "!=") return !equals(a, b);
    if (op == "in") return contains(b, a, line);
    if (op == "not in") return !contains(b, a, line);
    const int c = order(a, b, line);
    if (op == "<") return c < 0;
    if (op == "<=") return c <= 0;
    if (op == ">") return c > 0;
    return c >= 0;
  }

  // ---- Python methods on strings and dicts

  Value method(const Value& obj, const std::string& name) {
    const bool str_method = obj.is_string() &&
        (name == "strip" || name == "lstrip" || name == "rstrip" || name == "startswith" || name == "endswith" ||
         name == "split" || name == "rsplit" || name == "upper" || name == "lower" || name == "title" ||
         name == "capitalize" || name == "replace" || name == "find" || name == "count" || name == "join" ||
         name == "splitlines" || name == "isdigit" || name == "isalpha" || name == "isspace" || name == "format");
    const bool dict_method = obj.kind == Value::Kind::kDict && !obj.is_namespace &&
        (name == "items" || name == "keys" || name == "values" || name == "get");
    if (!str_method && !dict_method) return Value::undefined(name);
    auto c = std::make_shared<Callable>();
    c->name = name;
    c->call = [obj, name](Renderer& r, CallArgs& a) -> Value { return r.call_method(obj, name, a); };
    return Value::callable(std::move(c));
  }

  static std::string strip_chars(const std::string& s, const Value* chars, bool left, bool right) {
    const std::u32string u = decode_utf8(s);
    std::u32string set;
    const bool custom = chars && chars->is_string();
    if (custom) set = decode_utf8(chars->s);
    auto strip_it = [&](char32_t c) { return custom ? set.find(c) != std::u32string::npos : is_py_space(c); };
    size_t b = 0, e = u.size();
    if (left)
      while (b < e && strip_it(u[b])) ++b;
    if (right)
      while (e > b && strip_it(u[e - 1])) --e;
    return encode_utf8(std::u32string_view(u).substr(b, e - b));
  }

  const Value* arg(CallArgs& a, size_t idx, const char* kw) const {
    if (idx < a.pos.size()) return &a.pos[idx];
    for (const auto& [k, v] : a.kw)
      if (k == kw) return &v;
    return nullptr;
  }
  std::string str_arg(CallArgs& a, size_t idx, const char* kw, const char* what) const {
    const Value* v = arg(a, idx, kw);
    if (!v || !v->is_string()) error(a.line, cat(what, " needs a string argument"));
    return v->s;
  }

  static std::string replace_all(const std::string& s, const std::string& from, const std::string& to, int64_t count) {
    std::string out;
    if (from.empty()) {
      // Python inserts `to` around every code point.
      const std::u32string u = decode_utf8(s);
      int64_t done = 0;
      for (size_t k = 0; k <= u.size(); ++k) {
        if (count < 0 || done < count) {
          out += to;
          ++done;
        }
        if (k < u.size()) append_utf8(out, u[k]);
      }
      return out;
    }
    size_t p = 0;
    int64_t done = 0;
    while (count < 0 || done < count) {
      const size_t q = s.find(from, p);
      if (q == std::string::npos) break;
      out.append(s, p, q - p);
      out += to;
      p = q + from.size();
      ++done;
    }
    out.append(s, p);
    return out;
  }

  static ValueList py_split(const std::string& s, const Value* sep, int64_t maxsplit) {
    ValueList parts;
    if (!sep || sep->kind == Value::Kind::kNone) {
      const std::u32string u = decode_utf8(s);
      size_t k = 0;
      while (true) {
        while (k < u.size() && is_py_space(u[k])) ++k;
        if (k >= u.size()) break;
        if (maxsplit >= 0 && static_cast<int64_t>(parts.size()) >= maxsplit) {
          size_t e = u.size();
          while (e > k && is_py_space(u[e - 1])) --e;
          parts.push_back(Value::string(encode_utf8(std::u32string_view(u).substr(k, e - k))));
          break;
        }
        size_t e = k;
        while (e < u.size() && !is_py_space(u[e])) ++e;
        parts.push_back(Value::string(encode_utf8(std::u32string_view(u).substr(k, e - k))));
        k = e;
      }
      return parts;
    }
    size_t p = 0;
    while (maxsplit < 0 || static_cast<int64_t>(parts.size()) < maxsplit) {
      const size_t q = s.find(sep->s, p);
      if (q == std::string::npos) break;
      parts.push_back(Value::string(s.substr(p, q - p)));
      p = q + sep->s.size();
    }
    parts.push_back(Value::string(s.substr(p)));
    return parts;
  }

  static std::string py_title(const std::string& s) {
    std::u32string u = decode_utf8(s);
    bool prev_cased = false;
    for (auto& c : u) {
      const bool cased = is_cased_letter(c);
      c = cased ? (prev_cased ? to_lower_cp(c) : to_upper_cp(c)) : c;
      prev_cased = cased;
    }
    return encode_utf8(u);
  }

  static std::string py_capitalize(const std::string& s) {
    std::u32string u = decode_utf8(s);
    for (size_t k = 0; k < u.size(); ++k) u[k] = k == 0 ? to_upper_cp(u[k]) : to_lower_cp(u[k]);
    return encode_utf8(u);
  }

  Value call_method(const Value& obj, const std::string& name, CallArgs& a) {
    const int line = a.line;
    if (obj.kind == Value::Kind::kDict) {
      if (name == "get") {
        const Value* key = arg(a, 0, "key");
        if (!key) error(line, "get() needs a key");
        if (const Value* v = obj.dict->find(*key)) return *v;
        const Value* d = arg(a, 1, "default");
        return d ? *d : Value::none();
      }
      ValueList out;
      for (const auto& [k, v] : obj.dict->items) {
        if (name == "keys") out.push_back(k);
        else if (name == "values") out.push_back(v);
        else out.push_back(Value::make_list({k, v}, true));
      }
      return Value::make_list(std::move(out));
    }
    const std::string& s = obj.s;
    if (name == "strip" || name == "lstrip" || name == "rstrip") {
      const Value* chars = arg(a, 0, "chars");
      return Value::string(strip_chars(s, chars, name != "rstrip", name != "lstrip"));
    }
    if (name == "startswith" || name == "endswith") {
      const Value* p = arg(a, 0, "prefix");
      if (!p) error(line, cat(name, "() needs an argument"));
      auto test = [&](const Value& x) {
        if (!x.is_string()) error(line, cat(name, "() argument must be str or a tuple of str"));
        if (x.s.size() > s.size()) return false;
        return name == "startswith" ? s.compare(0, x.s.size(), x.s) == 0
                                    : s.compare(s.size() - x.s.size(), x.s.size(), x.s) == 0;
      };
      if (p->kind == Value::Kind::kList) return Value::boolean(std::any_of(p->list->begin(), p->list->end(), test));
      return Value::boolean(test(*p));
    }
    if (name == "split" || name == "rsplit") {
      const Value* sep = arg(a, 0, "sep");
      if (sep && sep->kind != Value::Kind::kNone && (!sep->is_string() || sep->s.empty()))
        error(line, "split() separator must be a non-empty string");
      const Value* mx = arg(a, 1, "maxsplit");
      const int64_t maxsplit = mx && mx->is_number() ? mx->as_int() : -1;
      if (name == "rsplit" && maxsplit >= 0) error(line, "rsplit() with maxsplit is not supported");
      return Value::make_list(py_split(s, sep, maxsplit));
    }
    if (name == "upper" || name == "lower") return Value::string(map_case(s, name == "upper"));
    if (name == "title") return Value::string(py_title(s));
    if (name == "capitalize") return Value::string(py_capitalize(s));
    if (name == "replace") {
      const Value* cnt = arg(a, 2, "count");
      const std::string r = replace_all(s, str_arg(a, 0, "old", "replace()"), str_arg(a, 1, "new", "replace()"),
                                        cnt && cnt->is_number() ? cnt->as_int() : -1);
      if (r.size() > kMaxOutputBytes) error(line, "string too long");
      return Value::string(r);
    }
    if (name == "find") {
      const size_t p = s.find(str_arg(a, 0, "sub", "find()"));
      if (p == std::string::npos) return Value::integer(-1);
      return Value::integer(static_cast<int64_t>(decode_utf8(s.substr(0, p)).size()));
    }
    if (name == "count") {
      const std::string sub = str_arg(a, 0, "sub", "count()");
      if (sub.empty()) return Value::integer(static_cast<int64_t>(decode_utf8(s).size()) + 1);
      int64_t n = 0;
      for (size_t p = s.find(sub); p != std::string::npos; p = s.find(sub, p + sub.size())) ++n;
      return Value::integer(n);
    }
    if (name == "join") {
      const Value* seq = arg(a, 0, "iterable");
      if (!seq) error(line, "join() needs an argument");
      std::string out;
      bool first = true;
      for (const auto& x : iterate(*seq, line)) {
        if (!x.is_string()) error(line, cat("sequence item: expected str instance, ", type_name(x), " found"));
        if (!first) out += s;
        first = false;
        out += x.s;
        if (out.size() > kMaxOutputBytes) error(line, "string too long");
      }
      return Value::string(std::move(out));
    }
    if (name == "splitlines") {
      ValueList parts;
      size_t p = 0;
      while (p < s.size()) {
        size_t q = s.find_first_of("\r\n", p);
        if (q == std::string::npos) {
          parts.push_back(Value::string(s.substr(p)));
          break;
        }
        parts.push_back(Value::string(s.substr(p, q - p)));
        p = q + ((s[q] == '\r' && q + 1 < s.size() && s[q + 1] == '\n') ? 2 : 1);
      }
      return Value::make_list(std::move(parts));
    }
    if (name == "isdigit" || name == "isalpha" || name == "isspace") {
      const std::u32string u = decode_utf8(s);
      if (u.empty()) return Value::boolean(false);
      return Value::boolean(std::all_of(u.begin(), u.end(), [&](char32_t c) {
        if (name == "isdigit") return c >= '0' && c <= '9';
        if (name == "isspace") return is_py_space(c);
        return is_cased_letter(c);
      }));
    }
    if (name == "format") error(line, "str.format() is not supported");
    error(line, cat("unknown method '", name, "'"));
  }

  // ---- filters

  Value attr_path(const Value& item, const Value& attribute, int line) {
    if (attribute.kind == Value::Kind::kInt) return get_item(item, attribute, line);
    if (!attribute.is_string()) error(line, "attribute must be a string or an integer");
    Value v = item;
    size_t p = 0;
    while (true) {
      const size_t q = attribute.s.find('.', p);
      std::string part = attribute.s.substr(p, q == std::string::npos ? std::string::npos : q - p);
      Value key = Value::string(part);
      if (!part.empty() && std::all_of(part.begin(), part.end(), [](char c) { return std::isdigit(static_cast<unsigned char>(c)); }))
        key = Value::integer(std::stoll(part));
      if (v.is_undefined()) return v;
      v = get_item(v, key, line);
      if (q == std::string::npos) return v;
      p = q + 1;
    }
  }

  Value apply_filter(const Expr& e, Value v, const ScopeP& scope) {
    CallArgs a = eval_args(e, scope, 1);
    return filter(e.name, std::move(v), a);
  }

  Value filter(const std::string& name, Value v, CallArgs& a) {
    const int line = a.line;
    auto need_str = [&]() -> std::string {
      if (v.is_undefined()) return "";
      return to_str(v);
    };
    if (name == "trim" || name == "strip") return Value::string(strip_chars(need_str(), arg(a, 0, "chars"), true, true));
    if (name == "length" || name == "count") {
      switch (v.kind) {
        case Value::Kind::kUndefined: return Value::integer(0);
        case Value::Kind::kString: return Value::integer(static_cast<int64_t>(decode_utf8(v.s).size()));
        case Value::Kind::kList: return Value::integer(static_cast<int64_t>(v.list->size()));
        case Value::Kind::kDict: return Value::integer(static_cast<int64_t>(v.dict->items.size()));
        default: error(line, cat("object of type '", type_name(v), "' has no len()"));
      }
    }
    if (name == "upper" || name == "lower") return Value::string(map_case(need_str(), name == "upper"));
    if (name == "capitalize") return Value::string(py_capitalize(need_str()));
    if (name == "title") {
      // Jinja2's title: words begin after whitespace, '-', '(', '{', '[' or '<'.
      std::u32string u = decode_utf8(need_str());
      bool start = true;
      for (auto& c : u) {
        const bool sep = is_py_space(c) || c == '-' || c == '(' || c == '{' || c == '[' || c == '<';
        if (!sep) c = start ? to_upper_cp(c) : to_lower_cp(c);
        start = sep;
      }
      return Value::string(encode_utf8(u));
    }
    if (name == "default" || name == "d") {
      const Value* dflt = arg(a, 0, "default_value");
      const Value* boolean = arg(a, 1, "boolean");
      const bool use = v.is_undefined() || (boolean && truthy(*boolean) && !truthy(v));
      if (use) return dflt ? *dflt : Value::string("");
      return v;
    }
    if (name == "join") {
      const Value* sep = arg(a, 0, "d");
      const Value* attribute = arg(a, 1, "attribute");
      std::string out;
      bool first = true;
      for (const auto& x : iterate(v, line)) {
        if (!first) out += sep ? to_str(*sep) : "";
        first = false;
        out += to_str(attribute ? attr_path(x, *attribute, line) : x);
        if (out.size() > kMaxOutputBytes) error(line, "string too long");
      }
      return Value::string(std::move(out));
    }
    if (name == "tojson") {
      JsonStyle st;
      // transformers' signature: tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)
      if (const Value* ea = arg(a, 0, "ensure_ascii")) st.ensure_ascii = truthy(*ea);
      const Value* indent = arg(a, 1, "indent");
      if (indent && indent->kind != Value::Kind::kNone) {
        st.pretty = true;
        st.item_sep = ",";
        if (indent->is_string()) {
          st.indent = indent->s;
        } else if (indent->is_number()) {
          st.indent = std::string(static_cast<size_t>(std::clamp<int64_t>(indent->as_int(), 0, 64)), ' ');
        }
      }
      if (const Value* seps = arg(a, 2, "separators"); seps && seps->kind == Value::Kind::kList && seps->list->size() == 2) {
        st.item_sep = to_str((*seps->list)[0]);
        st.key_sep = to_str((*seps->list)[1]);
      }
      if (const Value* sk = arg(a, 3, "sort_keys")) st.sort_keys = truthy(*sk);
      std::string out;
      to_json(out, v, st, 0, line);
      return Value::string(std::move(out));
    }
    if (name == "replace") {
      const Value* cnt = arg(a, 2, "count");
      const std::string r = replace_all(need_str(), str_arg(a, 0, "old", "replace"), str_arg(a, 1, "new", "replace"),
                                        cnt && cnt->is_number() ? cnt->as_int() : -1);
      if (r.size() > kMaxOutputBytes) error(line, "string too long");
      return Value::string(r);
    }
    if (name == "first" || name == "last") {
      ValueList items = iterate(v, line);
      if (items.empty()) return Value::undefined();
      return name == "first" ? items.front() : items.back();
    }
    if (name == "list") return Value::make_list(iterate(v, line));
    if (name == "string") return Value::string(to_str(v));
    if (name == "safe" || name == "generation") return v;
    if (name == "int" || name == "float") {
      const Value* dflt = arg(a, 0, "default");
      const bool want_int = name == "int";
      Value fallback = dflt ? *dflt : (want_int ? Value::integer(0) : Value::number(0.0));
      if (v.is_number()) return want_int ? Value::integer(v.kind == Value::Kind::kFloat ? static_cast<int64_t>(v.f) : v.as_int())
                                         : Value::number(v.as_double());
      if (!v.is_string()) return fallback;
      const std::string t = strip_chars(v.s, nullptr, true, true);
      if (want_int) {
        int64_t x = 0;
        auto [ptr, ec] = std::from_chars(t.data() + (t.size() && t[0] == '+' ? 1 : 0), t.data() + t.size(), x);
        if (ec == std::errc() && ptr == t.data() + t.size() && !t.empty()) return Value::integer(x);
      }
      char* end = nullptr;
      const double d = std::strtod(t.c_str(), &end);
      if (t.empty() || end != t.c_str() + t.size()) return fallback;
      if (want_int) {
        if (!std::isfinite(d) || std::fabs(d) > 9.2e18) return fallback;
        return Value::integer(static_cast<int64_t>(d));
      }
      return Value::number(d);
    }
    if (name == "items") {
      if (v.is_undefined()) return Value::make_list({});
      if (v.kind != Value::Kind::kDict) error(line, "items filter needs a mapping");
      CallArgs none;
      none.line = line;
      return call_method(v, "items", none);
    }
    if (name == "selectattr" || name == "rejectattr" || name == "select" || name == "reject") {
      const bool by_attr = name == "selectattr" || name == "rejectattr";
      const bool keep_if = name == "selectattr" || name == "select";
      size_t k = 0;
      Value attribute;
      if (by_attr) {
        if (a.pos.empty()) error(line, cat(name, " needs an attribute name"));
        attribute = a.pos[k++];
      }
      CallArgs targs;
      targs.line = line;
      std::string test;
      if (k < a.pos.size()) {
        if (!a.pos[k].is_string()) error(line, cat(name, ": test name must be a string"));
        test = a.pos[k++].s;
        for (; k < a.pos.size(); ++k) targs.pos.push_back(a.pos[k]);
      }
      ValueList out;
      for (const auto& x : iterate(v, line)) {
        const Value subject = by_attr ? attr_path(x, attribute, line) : x;
        const bool r = test.empty() ? truthy(subject) : apply_test(test, subject, targs);
        if (r == keep_if) out.push_back(x);
      }
      return Value::make_list(std::move(out));
    }
    if (name == "map") {
      ValueList out;
      const Value* attribute = nullptr;
      for (const auto& [k, x] : a.kw)
        if (k == "attribute") attribute = &x;
      if (attribute) {
        const Value* dflt = nullptr;
        for (const auto& [k, x] : a.kw)
          if (k == "default") dflt = &x;
        for (const auto& x : iterate(v, line)) {
          Value r = attr_path(x, *attribute, line);
          out.push_back(r.is_undefined() && dflt ? *dflt : r);
        }
        return Value::make_list(std::move(out));
      }
      if (a.pos.empty() || !a.pos[0].is_string()) error(line, "map needs a filter name or attribute=");
      CallArgs fargs;
      fargs.line = line;
      fargs.pos.assign(a.pos.begin() + 1, a.pos.end());
      fargs.kw = a.kw;
      for (const auto& x : iterate(v, line)) {
        CallArgs copy = fargs;
        out.push_back(filter(a.pos[0].s, x, copy));
      }
      return Value::make_list(std::move(out));
    }
    if (name == "reverse") {
      if (v.is_string()) {
        std::u32string u = decode_utf8(v.s);
        std::reverse(u.begin(), u.end());
        return Value::string(encode_utf8(u));
      }
      ValueList items = iterate(v, line);
      std::reverse(items.begin(), items.end());
      return Value::make_list(std::move(items));
    }
    if (name == "unique") {
      ValueList out;
      for (const auto& x : iterate(v, line)) {
        auto key = [](const Value& y) { return y.is_string() ? Value::string(map_case(y.s, false)) : y; };
        if (std::none_of(out.begin(), out.end(), [&](const Value& o) { return equals(key(o), key(x)); })) out.push_back(x);
      }
      return Value::make_list(std::move(out));
    }
    if (name == "sort" || name == "min" || name == "max") {
      const Value* rev = arg(a, 0, "reverse");
      const Value* cs = arg(a, 1, "case_sensitive");
      const Value* attribute = arg(a, 2, "attribute");
      if (name != "sort") {
        cs = arg(a, 0, "case_sensitive");
        attribute = arg(a, 1, "attribute");
        rev = nullptr;
      }
      ValueList items = iterate(v, line);
      auto key = [&](const Value& x) {
        Value y = attribute ? attr_path(x, *attribute, line) : x;
        if (y.is_string() && !(cs && truthy(*cs))) y.s = map_case(y.s, false);
        return y;
      };
      std::stable_sort(items.begin(), items.end(), [&](const Value& x, const Value& y) { return order(key(x), key(y), line) < 0; });
      if (name == "min") return items.empty() ? Value::undefined() : items.front();
      if (name == "max") {
        if (items.empty()) return Value::undefined();
        // Python's max returns the first maximal element.
        size_t best = items.size() - 1;
        while (best > 0 && order(key(items[best - 1]), key(items[best]), line) == 0) --best;
        return items[best];
      }
      if (rev && truthy(*rev)) {
        std::stable_sort(items.begin(), items.end(), [&](const Value& x, const Value& y) { return order(key(x), key(y), line) > 0; });
      }
      return Value::make_list(std::move(items));
    }
    if (name == "dictsort") {
      if (v.kind != Value::Kind::kDict) error(line, "dictsort needs a mapping");
      CallArgs none;
      none.line = line;
      Value items = call_method(v, "items", none);
      ValueList list = *items.list;
      std::stable_sort(list.begin(), list.end(), [&](const Value& x, const Value& y) {
        Value kx = (*x.list)[0], ky = (*y.list)[0];
        if (kx.is_string()) kx.s = map_case(kx.s, false);
        if (ky.is_string()) ky.s = map_case(ky.s, false);
        return order(kx, ky, line) < 0;
      });
      return Value::make_list(std::move(list));
    }
    if (name == "sum") {
      const Value* attribute = arg(a, 0, "attribute");
      const Value* start = arg(a, 1, "start");
      Value total = start ? *start : Value::integer(0);
      for (const auto& x : iterate(v, line)) total = binop("+", total, attribute ? attr_path(x, *attribute, line) : x, line);
      return total;
    }
    if (name == "abs") {
      if (!v.is_number()) error(line, cat("bad operand type for abs(): '", type_name(v), "'"));
      if (v.kind == Value::Kind::kFloat) return Value::number(std::fabs(v.f));
      if (v.as_int() == INT64_MIN) error(line, "integer overflow");
      return Value::integer(v.as_int() < 0 ? -v.as_int() : v.as_int());
    }
    if (name == "round") {
      if (!v.is_number()) error(line, "round needs a number");
      const Value* prec = arg(a, 0, "precision");
      const Value* method_v = arg(a, 1, "method");
      const std::string m = method_v && method_v->is_string() ? method_v->s : "common";
      const double scale = std::pow(10.0, prec && prec->is_number() ? static_cast<double>(prec->as_int()) : 0.0);
      const double x = v.as_double() * scale;
      const double r = m == "ceil" ? std::ceil(x) : m == "floor" ? std::floor(x) : std::round(x);
      return Value::number(r / scale);
    }
    if (name == "indent") {
      const Value* width = arg(a, 0, "width");
      const Value* first = arg(a, 1, "first");
      const Value* blank = arg(a, 2, "blank");
      const std::string pad = width && width->is_string() ? width->s
                              : std::string(static_cast<size_t>(std::clamp<int64_t>(width && width->is_number() ? width->as_int() : 4, 0, 256)), ' ');
      const std::string s = need_str();
      std::string out;
      size_t p = 0;
      bool first_line = true;
      while (true) {
        const size_t q = s.find('\n', p);
        const std::string ln = s.substr(p, q == std::string::npos ? std::string::npos : q - p);
        const bool add = first_line ? (first && truthy(*first)) : (!ln.empty() || (blank && truthy(*blank)));
        if (add) out += pad;
        out += ln;
        if (out.size() > kMaxOutputBytes) error(line, "string too long");
        if (q == std::string::npos) break;
        out += '\n';
        p = q + 1;
        first_line = false;
      }
      return Value::string(std::move(out));
    }
    if (name == "escape" || name == "e") {
      std::string out;
      for (char c : need_str()) {
        switch (c) {
          case '&': out += "&amp;"; break;
          case '<': out += "&lt;"; break;
          case '>': out += "&gt;"; break;
          case '"': out += "&#34;"; break;
          case '\'': out += "&#39;"; break;
          default: out += c;
        }
      }
      return Value::string(std::move(out));
    }
    if (name == "attr") {
      const Value* n = arg(a, 0, "name");
      if (!n || !n->is_string()) error(line, "attr needs a name");
      return get_attr(v, n->s, line);
    }
    error(line, cat("no filter named '", name, "'"));
  }

  // ---- tests

  bool apply_test(const std::string& name, const Value& v, CallArgs& a) {
    const int line = a.line;
    auto other = [&]() -> const Value& {
      if (a.pos.empty()) error(line, cat("test '", name, "' needs an argument"));
      return a.pos[0];
    };
    if (name == "defined") return !v.is_undefined();
    if (name == "undefined") return v.is_undefined();
    if (name == "none") return v.kind == Value::Kind::kNone;
    if (name == "string") return v.is_string();
    if (name == "mapping") return v.kind == Value::Kind::kDict && !v.is_namespace;
    if (name == "sequence") return v.is_string() || v.kind == Value::Kind::kList || (v.kind == Value::Kind::kDict && !v.is_namespace);
    if (name == "iterable") return v.is_string() || v.kind == Value::Kind::kList || v.kind == Value::Kind::kDict || v.is_undefined();
    if (name == "number") return v.is_number();
    if (name == "integer") return v.kind == Value::Kind::kInt;
    if (name == "float") return v.kind == Value::Kind::kFloat;
    if (name == "boolean") return v.kind == Value::Kind::kBool;
    if (name == "true") return v.kind == Value::Kind::kBool && v.b;
    if (name == "false") return v.kind == Value::Kind::kBool && !v.b;
    if (name == "callable") return v.kind == Value::Kind::kCallable;
    if (name == "odd" || name == "even") {
      if (v.kind != Value::Kind::kInt && v.kind != Value::Kind::kBool) error(line, cat("test '", name, "' needs an integer"));
      const bool odd = (v.as_int() % 2) != 0;
      return name == "odd" ? odd : !odd;
    }
    if (name == "divisibleby") {
      const Value& d = other();
      if (!v.is_number() || !d.is_number()) error(line, "divisibleby needs numbers");
      if (d.as_double() == 0) error(line, "divisibleby zero");
      return equals(binop("%", v, d, line), Value::integer(0));
    }
    if (name == "eq" || name == "equalto" || name == "==") return equals(v, other());
    if (name == "ne" || name == "!=") return !equals(v, other());
    if (name == "lt" || name == "lessthan" || name == "<") return order(v, other(), line) < 0;
    if (name == "le" || name == "<=") return order(v, other(), line) <= 0;
    if (name == "gt" || name == "greaterthan" || name == ">") return order(v, other(), line) > 0;
    if (name == "ge" || name == ">=") return order(v, other(), line) >= 0;
    if (name == "in") return contains(other(), v, line);
    if (name == "sameas") {
      const Value& o = other();
      if (v.kind != o.kind) return false;
      if (v.kind == Value::Kind::kList) return v.list == o.list;
      if (v.kind == Value::Kind::kDict) return v.dict == o.dict;
      return equals(v, o);
    }
    if (name == "lower" || name == "upper") return v.is_string() && map_case(v.s, name == "upper") == v.s;
    error(line, cat("no test named '", name, "'"));
  }

  int64_t iterations_ = 0;
  int call_depth_ = 0;
  int eval_depth_ = 0;
};

}  // namespace

ChatTemplate::ChatTemplate(std::string source) {
  auto impl = std::make_shared<Impl>();
  Parser parser(Lexer(source).run());
  impl->body = parser.parse_template();
  impl_ = std::move(impl);
}

namespace {

template <typename Json>
std::string render_json_context(const Body& body, const Json& context) {
  if (!context.is_object()) fail("chat template context must be a JSON object");
  auto top = std::make_shared<Scope>();
  for (auto it = context.begin(); it != context.end(); ++it) top->vars[it.key()] = from_json(it.value());
  Renderer r;
  std::string out;
  try {
    r.exec(body, top, out);
  } catch (const TemplateRaise& e) {
    throw Error(e.message);
  }
  return out;
}

}  // namespace

std::string ChatTemplate::render(const nlohmann::json& context) const {
  return render_json_context(impl_->body, context);
}

std::string ChatTemplate::render(const nlohmann::ordered_json& context) const {
  return render_json_context(impl_->body, context);
}

std::string ChatTemplate::render(const std::vector<ChatMessage>& messages, bool add_generation_prompt,
                                 const std::string& bos_token, const std::string& eos_token) const {
  // Built as an ordered structure (not nlohmann::json, which sorts keys) so that tojson of a message
  // prints role before content, as Python's dicts do.
  auto top = std::make_shared<Scope>();
  ValueList list;
  for (const auto& m : messages) {
    auto d = std::make_shared<DictData>();
    d->items.emplace_back(Value::string("role"), Value::string(m.role));
    d->items.emplace_back(Value::string("content"), Value::string(m.content));
    list.push_back(Value::make_dict(std::move(d)));
  }
  top->vars["messages"] = Value::make_list(std::move(list));
  top->vars["add_generation_prompt"] = Value::boolean(add_generation_prompt);
  top->vars["bos_token"] = Value::string(bos_token);
  top->vars["eos_token"] = Value::string(eos_token);
  Renderer r;
  std::string out;
  try {
    r.exec(impl_->body, top, out);
  } catch (const TemplateRaise& e) {
    throw Error(e.message);
  }
  return out;
}

}  // namespace shardlm
