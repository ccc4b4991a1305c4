// libFuzzer target: a safetensors file (8-byte header length, JSON header, data), a
// model.safetensors.index.json and a config.json, all from the same bytes. Refusals are shardlm::Error;
// nothing may crash, leak or read out of bounds.
#include <cstdint>
#include <string_view>

#include "config/hf_config.h"
#include "core/error.h"
#include "formats/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace shardlm;
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  uint64_t sum = 0;
  try {
    auto f = SafetensorsFile::from_memory(data, size, "fuzz.safetensors");
    for (const SafetensorsTensor& t : f->tensors())
      if (t.n_bytes > 0) sum += t.data[0] + t.data[t.n_bytes - 1];  // promised to be inside the buffer
  } catch (const Error&) {
  }
  try {
    sum += parse_safetensors_index(text, "fuzz.index.json").size();
  } catch (const Error&) {
  }
  try {
    const HfConfig c = parse_hf_config(text, "fuzz/config.json");
    sum += static_cast<uint64_t>(c.model.n_layer);
  } catch (const Error&) {
  }
  return static_cast<int>(sum & 0);
}
