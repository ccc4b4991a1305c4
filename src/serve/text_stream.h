// Generated text as a client sees it: token pieces (bytes) in, text out, such that
//   - no text is emitted while it could still be the start of a stop string; a stop string matched across
//     token boundaries ends the text before it (the stop string itself is never returned);
//   - no half of a UTF-8 character is ever emitted: the incomplete bytes at the end are held back until
//     the token that completes them arrives, and bytes that can never form a character become U+FFFD;
//   - the concatenation of everything emitted is the same however the pieces were split into pushes, so a
//     streamed response and a whole one carry the same text.
// Pure (tested in tests/serve/test_text_stream.cpp).
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <vector>

namespace shardlm::serve {

// Bytes at the end of `s` that begin a UTF-8 character not yet complete (0..3): a lead byte followed by
// fewer continuation bytes than it announces. Invalid bytes do not count (they are never completed).
size_t utf8_incomplete_tail(std::string_view s);

// `s` with every byte sequence that is not valid UTF-8 replaced by U+FFFD (overlong forms, surrogates
// and code points above U+10FFFF included), one replacement per maximal invalid subpart.
std::string sanitize_utf8(std::string_view s);

// Length of the longest suffix of `text` that is a proper prefix of one of `stops` (0 if none).
size_t stop_prefix_suffix(std::string_view text, const std::vector<std::string>& stops);

class TextStream {
 public:
  explicit TextStream(std::vector<std::string> stops = {});

  // Appends one token's bytes; returns the text that may now be emitted (possibly empty). After a stop
  // string matched, returns "" and ignores further pushes.
  std::string push(std::string_view bytes);
  // The end of generation: what is still held back (a partial stop string, which did not happen; an
  // incomplete character, as U+FFFD). Returns "" after a stop string.
  std::string finish();

  bool stopped() const { return stopped_; }
  const std::string& stop_matched() const { return matched_; }
  // Everything emitted so far.
  const std::string& text() const { return text_; }

 private:
  std::string emit(std::string_view s);

  std::vector<std::string> stops_;
  std::string pending_;  // received, not yet emitted
  std::string text_;
  std::string matched_;
  bool stopped_ = false;
};

}  // namespace shardlm::serve
