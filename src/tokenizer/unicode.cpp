#include "tokenizer/unicode.h"

#include <algorithm>

namespace shardlm {

Utf8Char utf8_decode(std::string_view s, size_t pos) {
  const auto b = [&](size_t i) { return static_cast<uint8_t>(s[pos + i]); };
  const size_t avail = s.size() - pos;
  const uint8_t c0 = b(0);
  if (c0 < 0x80) return {c0, 1};
  const auto cont = [&](size_t i) { return i < avail && (b(i) & 0xC0) == 0x80; };
  if ((c0 & 0xE0) == 0xC0 && cont(1)) {
    const uint32_t cp = ((c0 & 0x1Fu) << 6) | (b(1) & 0x3Fu);
    if (cp >= 0x80) return {cp, 2};
  } else if ((c0 & 0xF0) == 0xE0 && cont(1) && cont(2)) {
    const uint32_t cp = ((c0 & 0x0Fu) << 12) | ((b(1) & 0x3Fu) << 6) | (b(2) & 0x3Fu);
    if (cp >= 0x800 && (cp < 0xD800 || cp > 0xDFFF)) return {cp, 3};
  } else if ((c0 & 0xF8) == 0xF0 && cont(1) && cont(2) && cont(3)) {
    const uint32_t cp = ((c0 & 0x07u) << 18) | ((b(1) & 0x3Fu) << 12) | ((b(2) & 0x3Fu) << 6) |
                        (b(3) & 0x3Fu);
    if (cp >= 0x10000 && cp <= 0x10FFFF) return {cp, 4};
  }
  return {kReplacementChar, 1};
}

void utf8_append(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

namespace {

bool in_ranges(const CodepointRange* r, size_t n, uint32_t cp) {
  const CodepointRange* end = r + n;
  // First range whose last >= cp; cp is inside iff that range also starts at or before it.
  const CodepointRange* it =
      std::lower_bound(r, end, cp, [](const CodepointRange& a, uint32_t v) { return a.last < v; });
  return it != end && it->first <= cp;
}

}  // namespace

bool is_letter(uint32_t cp) {
  if (cp < 0x80) return (cp | 0x20) >= 'a' && (cp | 0x20) <= 'z';
  return in_ranges(unicode_data::kLetterRanges, unicode_data::kLetterRanges_size, cp);
}

bool is_number(uint32_t cp) {
  if (cp < 0x80) return cp >= '0' && cp <= '9';
  return in_ranges(unicode_data::kNumberRanges, unicode_data::kNumberRanges_size, cp);
}

bool is_whitespace(uint32_t cp) {
  switch (cp) {
    case 0x09: case 0x0A: case 0x0B: case 0x0C: case 0x0D: case 0x20: case 0x85: case 0xA0:
    case 0x1680: case 0x2028: case 0x2029: case 0x202F: case 0x205F: case 0x3000:
      return true;
    default:
      return cp >= 0x2000 && cp <= 0x200A;
  }
}

namespace {

struct ByteMaps {
  std::array<std::string, 256> to_unicode;
  std::array<int16_t, 324> from_unicode;  // codepoints used by the mapping are all < 324
};

ByteMaps make_byte_maps() {
  ByteMaps m;
  m.from_unicode.fill(-1);
  // Printable Latin-1 bytes map to themselves; the rest are moved to 256, 257, ... in byte order.
  uint32_t next = 256;
  for (uint32_t b = 0; b < 256; ++b) {
    const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
    const uint32_t cp = printable ? b : next++;
    utf8_append(m.to_unicode[b], cp);
    m.from_unicode[cp] = static_cast<int16_t>(b);
  }
  return m;
}

const ByteMaps& byte_maps() {
  static const ByteMaps m = make_byte_maps();  // immutable after construction
  return m;
}

}  // namespace

const std::array<std::string, 256>& byte_to_unicode() { return byte_maps().to_unicode; }

int unicode_to_byte(uint32_t cp) {
  const auto& f = byte_maps().from_unicode;
  return cp < f.size() ? f[cp] : -1;
}

}  // namespace shardlm
