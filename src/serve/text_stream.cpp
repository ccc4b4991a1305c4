#include "serve/text_stream.h"

#include <algorithm>

namespace shardlm::serve {

namespace {

// Bytes a character that starts with `c` has (1..4), or 0 when `c` cannot start one.
size_t utf8_len(unsigned char c) {
  if (c < 0x80) return 1;
  if (c >= 0xC2 && c <= 0xDF) return 2;
  if (c >= 0xE0 && c <= 0xEF) return 3;
  if (c >= 0xF0 && c <= 0xF4) return 4;
  return 0;  // a continuation byte, C0/C1 (overlong) or F5..FF
}

// Whether `c` may be the byte at index `i` (1..3) of a character starting with `lead` (RFC 3629's table:
// the second byte's range depends on the lead, which rules out overlong forms, surrogates and > U+10FFFF).
bool valid_next(unsigned char lead, size_t i, unsigned char c) {
  if (i == 1) {
    if (lead == 0xE0) return c >= 0xA0 && c <= 0xBF;
    if (lead == 0xED) return c >= 0x80 && c <= 0x9F;
    if (lead == 0xF0) return c >= 0x90 && c <= 0xBF;
    if (lead == 0xF4) return c >= 0x80 && c <= 0x8F;
  }
  return c >= 0x80 && c <= 0xBF;
}

constexpr std::string_view kReplacement = "\xEF\xBF\xBD";

}  // namespace

size_t utf8_incomplete_tail(std::string_view s) {
  // A character has at most 4 bytes: look for its lead among the last 3.
  for (size_t back = 1; back <= std::min<size_t>(3, s.size()); ++back) {
    const size_t start = s.size() - back;
    const auto lead = static_cast<unsigned char>(s[start]);
    if ((lead & 0xC0) == 0x80) continue;  // a continuation byte: the lead is further back
    const size_t need = utf8_len(lead);
    if (need <= back) return 0;           // complete (or invalid): nothing to wait for
    for (size_t i = 1; i < back; ++i)
      if (!valid_next(lead, i, static_cast<unsigned char>(s[start + i]))) return 0;  // can never complete
    return back;
  }
  return 0;
}

std::string sanitize_utf8(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  size_t i = 0;
  while (i < s.size()) {
    const auto lead = static_cast<unsigned char>(s[i]);
    const size_t need = utf8_len(lead);
    if (need == 1) {
      out.push_back(static_cast<char>(lead));
      ++i;
      continue;
    }
    if (need == 0) {
      out += kReplacement;
      ++i;
      continue;
    }
    size_t k = 1;
    while (k < need && i + k < s.size() && valid_next(lead, k, static_cast<unsigned char>(s[i + k]))) ++k;
    if (k == need) {
      out.append(s.substr(i, need));
    } else {
      out += kReplacement;  // the maximal subpart that could have started a character
    }
    i += k;
  }
  return out;
}

size_t stop_prefix_suffix(std::string_view text, const std::vector<std::string>& stops) {
  size_t best = 0;
  for (const std::string& s : stops) {
    for (size_t k = std::min(s.size() - (s.empty() ? 0 : 1), text.size()); k > best; --k) {
      if (text.substr(text.size() - k) == std::string_view(s).substr(0, k)) {
        best = k;
        break;
      }
    }
  }
  return best;
}

TextStream::TextStream(std::vector<std::string> stops) : stops_(std::move(stops)) {
  stops_.erase(std::remove(stops_.begin(), stops_.end(), std::string()), stops_.end());
}

std::string TextStream::emit(std::string_view s) {
  std::string out = sanitize_utf8(s);
  text_ += out;
  return out;
}

std::string TextStream::push(std::string_view bytes) {
  if (stopped_) return {};
  pending_.append(bytes);
  // Text already emitted never contains the start of a match (it was held back while it could be one), so
  // a match lies within pending_: the earliest one wins.
  size_t at = std::string::npos;
  for (const std::string& s : stops_) {
    const size_t p = pending_.find(s);
    if (p != std::string::npos && (p < at || (p == at && s.size() > matched_.size()))) {
      at = p;
      matched_ = s;
    }
  }
  if (at != std::string::npos) {
    stopped_ = true;
    std::string out = emit(std::string_view(pending_).substr(0, at));
    pending_.clear();
    return out;
  }
  const size_t hold = std::max(stop_prefix_suffix(pending_, stops_), utf8_incomplete_tail(pending_));
  std::string out = emit(std::string_view(pending_).substr(0, pending_.size() - hold));
  pending_.erase(0, pending_.size() - hold);
  return out;
}

std::string TextStream::finish() {
  if (stopped_) return {};
  std::string out = emit(pending_);
  pending_.clear();
  return out;
}

}  // namespace shardlm::serve
