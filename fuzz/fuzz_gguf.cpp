// libFuzzer target: the GGUF reader on arbitrary bytes (header, metadata, tensor table), then everything a
// model load reads from a valid file: the typed getters, the tensor views, and the model configuration and
// vocabulary built from it (through a file, as a user's model arrives). Any input may be refused with
// shardlm::Error; nothing may crash, leak or read out of bounds.
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <string>

#include "core/error.h"
#include "formats/gguf.h"
#include "loader/model_source.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace shardlm;
  std::unique_ptr<GgufFile> f;
  try {
    f = GgufFile::from_memory(data, size, "fuzz.gguf");
  } catch (const Error&) {
    return 0;
  }
  uint64_t sum = 0;
  for (const GgufKV& kv : f->kvs()) {
    try {
      (void)f->get_uint(kv.key);
      (void)f->get_string(kv.key);
      (void)f->get_float_array(kv.key);
      (void)f->get_int_array(kv.key);
    } catch (const Error&) {
    }
  }
  for (const GgufTensorInfo& t : f->tensors()) {
    const uint8_t* p = f->tensor_data(t);
    if (t.n_bytes > 0) sum += p[0] + p[t.n_bytes - 1];  // the reader promised these bytes are in the file
  }
  // The model source on top of it: config, vocabulary, tensor mapping.
  static const std::string path = "/dev/shm/shardlm-fuzz-" + std::to_string(getpid()) + ".gguf";
  if (FILE* out = std::fopen(path.c_str(), "wb")) {
    std::fwrite(data, 1, size, out);
    std::fclose(out);
    try {
      auto src = open_model_source(path);
      sum += static_cast<uint64_t>(src->config().n_layer) + src->tensors().size();
      if (src->vocab()) sum += src->vocab()->tokens.size();
    } catch (const Error&) {
    }
    std::remove(path.c_str());
  }
  return static_cast<int>(sum & 0);
}
